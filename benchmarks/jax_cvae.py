"""JAX peer of cvae (jax.jit + optax), for benchmarks only (benchmark-only dependency).

    python benchmarks/jax_cvae.py bench --variant full --batch 64 --threads 1,2 --steps 200 --warmup 30 [--json]
    python benchmarks/jax_cvae.py bench --variant conv [--channels 32,64 --hidden 512 --latent 128] ...

The same model, loss, optimizer and initialisation as torch_cvae.py (see benchmarks/README.md),
with the same command line and JSON record ({"impl": "jax", ...}). The whole training step
(forward, loss, gradient, Adam update) is one jitted XLA computation.

Threads. XLA's CPU client sizes its thread pools from the CPUs the process may run on, and XLA
has no flag that caps its intra-op pool (`intra_op_parallelism_threads` is a TensorFlow session
option; XLA_FLAGS rejects it). So each thread count runs in its own process that first restricts
itself to N CPUs with os.sched_setaffinity, and only then imports jax. The records carry
"cpu_per_wall" (process CPU seconds per wall second over the timed steps), "cpus" (the
affinity set) and "os_threads" (the threads the process has: XLA's pools grow with the affinity
set) so that what was used can be checked; see benchmarks/README.md for what was seen.
"""
import argparse, json, os, subprocess, sys, time

import numpy as np

from peer_data import CONV_VARIANTS, VARIANTS, digits_of, load_mnist_np, thread_counts


def pin_to(n):
    """Restrict this process (and every thread it starts later) to the first n CPUs it may use.
    Must run before jax is imported: XLA sizes its pools when its client is created."""
    allowed = sorted(os.sched_getaffinity(0))
    if n > len(allowed):
        raise SystemExit(f"jax_cvae: --threads {n} but only {len(allowed)} CPUs are available")
    os.sched_setaffinity(0, allowed[:n])
    return allowed[:n]


def uniform_init(rng, shape, fan_in):
    """PyTorch's default init of nn.Linear, nn.Conv2d and nn.ConvTranspose2d: weight and bias both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5) reduces to that bound)."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def mlp_net(variant, rng, activation):
    """-> (params, encode, decode, latent) of an MLP variant: [x ; c] -> h1 -> h2 -> 2L; [z ; c] -> h2 -> h1 -> 784."""
    import jax.numpy as jnp

    h1, h2, latent, _ = VARIANTS[variant]
    sizes = [(784 + 10, h1), (h1, h2), (h2, 2 * latent), (latent + 10, h2), (h2, h1), (h1, 784)]
    params = [(jnp.asarray(uniform_init(rng, (i, o), i)), jnp.asarray(uniform_init(rng, (o,), i))) for i, o in sizes]

    def mlp(layers, h):
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                h = activation(h)
        return h

    def encode(params, x, c):
        return mlp(params[:3], jnp.concatenate([x, c], 1))

    def decode(params, z, c):
        return mlp(params[3:], jnp.concatenate([z, c], 1))

    return params, encode, decode, latent


def conv_net(arch, rng, activation):
    """-> (params, encode, decode, latent) of the conv variant (issue 17; torch_cvae.ConvCVAE):
    conv 1->C1, C1->C2 (4x4, stride 2, pad 1: 28->14->7), [flatten ; c] -> H -> 2L;
    [z ; c] -> H -> C2*49 -> transposed conv C2->C1 (7->14) -> C1->1 (14->28). The maps are NHWC
    and the kernels HWIO, XLA CPU's own layouts (the flatten order differs from PyTorch's CHW by
    a fixed permutation of the fc rows: the same model). A transposed conv (4x4, stride 2, pad 1)
    is the conv of the input dilated by 2 (lhs_dilation), padded by 4-1-1 = 2, with the kernel
    flipped, as PyTorch defines it."""
    import jax.numpy as jnp
    from jax import lax

    (c1, c2), hidden, latent = arch
    flat = c2 * 49

    def conv(cin, cout, fan_in):
        return (jnp.asarray(uniform_init(rng, (4, 4, cin, cout), fan_in)), jnp.asarray(uniform_init(rng, (cout,), fan_in)))

    def linear(i, o):
        return (jnp.asarray(uniform_init(rng, (i, o), i)), jnp.asarray(uniform_init(rng, (o,), i)))

    # fan_in as PyTorch computes it: C_in*16 for a conv, C_out*16 for a transposed conv
    params = [conv(1, c1, 16), conv(c1, c2, 16 * c1), linear(flat + 10, hidden), linear(hidden, 2 * latent),
              linear(latent + 10, hidden), linear(hidden, flat), conv(c2, c1, 16 * c1), conv(c1, 1, 16)]
    dims = ("NHWC", "HWIO", "NHWC")

    def down(h, wb):
        return lax.conv_general_dilated(h, wb[0], (2, 2), ((1, 1), (1, 1)), dimension_numbers=dims) + wb[1]

    def up(h, wb):
        return lax.conv_general_dilated(h, wb[0][::-1, ::-1], (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2),
                                        dimension_numbers=dims) + wb[1]

    def encode(params, x, c):
        h = activation(down(x.reshape(-1, 28, 28, 1), params[0]))
        h = activation(down(h, params[1])).reshape(len(x), flat)
        h = activation(jnp.concatenate([h, c], 1) @ params[2][0] + params[2][1])
        return h @ params[3][0] + params[3][1]

    def decode(params, z, c):
        h = activation(jnp.concatenate([z, c], 1) @ params[4][0] + params[4][1])
        h = activation(h @ params[5][0] + params[5][1]).reshape(-1, 7, 7, c2)
        h = activation(up(h, params[6]))
        return up(h, params[7]).reshape(-1, 784)

    return params, encode, decode, latent


def build(variant, batch, lr=1e-3, seed=0, act="elu", arch=None, init=None):
    """-> (step, params, opt_state, key): step(params, opt_state, key, x, y) -> the same + loss.
    arch: a conv variant's ((C1, C2), H, L); None: its defaults (peer_data.CONV_VARIANTS).
    init: starting weights in place of the random ones, in the same structure (check_peers gives
    the conv model PyTorch's, so that only the eps draws differ)."""
    import jax
    import jax.numpy as jnp
    import optax

    activation = {"elu": jax.nn.elu, "relu": jax.nn.relu}[act]
    rng = np.random.default_rng(seed)
    if variant in CONV_VARIANTS:
        params, encode, decode, latent = conv_net(arch or CONV_VARIANTS[variant][:3], rng, activation)
    else:
        params, encode, decode, latent = mlp_net(variant, rng, activation)
    if init is not None:
        params = jax.tree_util.tree_map(lambda p, q: jnp.asarray(q, p.dtype).reshape(p.shape), params, init)

    def loss_fn(params, key, x, y):
        c = jax.nn.one_hot(y, 10, dtype=x.dtype)
        stats = encode(params, x, c)
        mu, logvar = stats[:, :latent], stats[:, latent:]
        z = mu + jax.random.normal(key, mu.shape, mu.dtype) * jnp.exp(0.5 * logvar)
        logits = decode(params, z, c)
        bce = optax.sigmoid_binary_cross_entropy(logits, x).sum(1)
        kl = -0.5 * (1 + logvar - mu ** 2 - jnp.exp(logvar)).sum(1)
        return (bce + kl).mean()

    opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)  # eps outside the sqrt, as torch.optim.Adam

    def step(params, opt_state, key, x, y):
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, sub, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    # params and opt_state are donated: XLA updates them in place, as PyTorch's optimizer does.
    return jax.jit(step, donate_argnums=(0, 1)), params, opt.init(params), jax.random.PRNGKey(seed)


def bench_jax(variant, batch, steps, warmup, act="elu", lr=1e-3, seed=0, data=None, stats=None, arch=None):
    """Images/s over `steps` timed steps after `warmup` untimed ones (the first compiles). Only the
    step is timed, up to its results being ready (block_until_ready); gathering the batch and
    handing it to the device is not, as in torch_cvae.bench_torch."""
    import jax

    x, y = data if data is not None else load_mnist_np("train", digits_of(variant))
    step, params, opt_state, key = build(variant, batch, lr, seed, act, arch)
    order = np.random.default_rng(seed)
    perm, pos = order.permutation(len(x)), 0
    elapsed = cpu = 0.0
    for s in range(warmup + steps):
        if pos + batch > len(x):  # full batches only; reshuffle every pass
            perm, pos = order.permutation(len(x)), 0
        idx = perm[pos:pos + batch]
        pos += batch
        xb, yb = jax.block_until_ready((jax.device_put(x[idx]), jax.device_put(y[idx].astype(np.int32))))
        c0, t0 = time.process_time(), time.perf_counter()
        params, opt_state, key, loss = jax.block_until_ready(step(params, opt_state, key, xb, yb))
        if s >= warmup:
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
    if not np.isfinite(float(loss)):
        raise SystemExit(f"jax_cvae: the loss diverged ({float(loss)})")
    if stats is not None:
        stats["cpu_per_wall"] = round(cpu / elapsed, 2)
        if os.path.isdir("/proc/self/task"):  # XLA's pools are sized from the affinity: this shows it
            stats["os_threads"] = len(os.listdir("/proc/self/task"))
    return steps * batch / elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--variant", choices=(*VARIANTS, *CONV_VARIANTS), default="full")
    b.add_argument("--channels", default=None, metavar="C1,C2", help="conv only (default 32,64)")
    b.add_argument("--hidden", type=int, default=None, help="conv only (default 512)")
    b.add_argument("--latent", type=int, default=None, help="conv only (default 128)")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--act", choices=("elu", "relu"), default="elu")
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true", help="one JSON object per line")
    b.add_argument("--threads", default="1,2", help="comma-separated thread counts, each in its own process")
    b.add_argument("--steps", type=int, default=200, help="timed steps (after warmup)")
    b.add_argument("--warmup", type=int, default=30, help="untimed steps first (the first one compiles)")
    a = p.parse_args(argv)
    counts = thread_counts(a.threads)
    conv = a.variant in CONV_VARIANTS
    given = [k for k in ("channels", "hidden", "latent") if getattr(a, k) is not None]
    if given and not conv:
        p.error(f"--{', --'.join(given)}: only with a conv variant ({', '.join(CONV_VARIANTS)})")
    arch = None
    if conv:
        c, h, z, _ = CONV_VARIANTS[a.variant]
        try:
            channels = tuple(int(v) for v in a.channels.split(",")) if a.channels else c
        except ValueError:
            channels = ()
        if len(channels) != 2 or min(channels) < 1:
            p.error(f"--channels {a.channels}: two positive channel counts, C1,C2")
        arch = (channels, a.hidden or h, a.latent or z)
    if len(counts) > 1:
        # One process per thread count: the affinity must be set before jax starts its pools.
        for n in counts:
            child = ["bench", "--variant", a.variant, "--batch", str(a.batch), "--act", a.act, "--lr", str(a.lr),
                     "--seed", str(a.seed), "--steps", str(a.steps), "--warmup", str(a.warmup),
                     "--threads", str(n)] + (["--json"] if a.json else [])
            for k in given:
                child += [f"--{k}", str(getattr(a, k))]
            code = subprocess.run([sys.executable, os.path.abspath(__file__)] + child).returncode
            if code:
                return code
        return 0

    n = counts[0]
    cpus = pin_to(n)
    import jax
    import jaxlib

    info = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "devices": [str(d) for d in jax.devices()],
            "cpus": cpus, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    if a.json:  # stdout carries only the records; the header goes to stderr
        print(json.dumps(info), file=sys.stderr, flush=True)
    else:
        print(f"jax {info['jax']} on CPUs {cpus}", flush=True)
    stats = {}
    ips = bench_jax(a.variant, a.batch, a.steps, a.warmup, a.act, a.lr, a.seed, stats=stats, arch=arch)
    shape = {"channels": list(arch[0]), "hidden": arch[1], "latent": arch[2]} if conv else {}
    rec = {"impl": "jax", "variant": a.variant, **shape, "batch": a.batch, "threads": n,
           "img_per_s": round(ips, 1), "steps": a.steps, "cpus": cpus, **stats}
    print(json.dumps(rec) if a.json else
          f"jax {a.variant} batch {a.batch} threads {n}: {ips:.0f} img/s ({a.steps} steps, "
          f"{stats['cpu_per_wall']} CPU s per s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
