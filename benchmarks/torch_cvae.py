"""PyTorch peer of cvae, for benchmarks and quality reference (benchmark-only dependency).

    python benchmarks/torch_cvae.py bench --variant full --batch 64 --threads 1,2 --steps 200 --warmup 30 [--precision bf16] [--json]
    python benchmarks/torch_cvae.py bench --variant conv --batch 64 --threads 1,2 [--channels 32,64 --hidden 512 --latent 128]
                                          [--fused] [--compile] [--channels-last] [--precision bf16] [--json]
    python benchmarks/torch_cvae.py train --variant full --epochs 10 --batch 64 --beta 1 --threads 2 --seed 0 [--json] [--save-cvae DIR]

Importable: bench_torch(variant, batch, threads, steps, warmup) -> img/s; train_torch(...) -> per-epoch test -ELBO.
"""
import argparse, contextlib, json, os, sys, time

import torch
import torch.nn.functional as F
from torch import nn

from peer_data import CONV_VARIANTS, VARIANTS, digits_of, load_mnist_np, thread_counts

PRECISIONS = ("fp32", "bf16")


def load_mnist(split, digits, data_dir=None):
    """-> x float32 (n, 784) = bytes/255 (not binarised), y int64 (n,), only the given digits."""
    x, y = load_mnist_np(split, digits, data_dir)
    return torch.from_numpy(x), torch.from_numpy(y)


class CVAE(nn.Module):
    def __init__(self, h1, h2, latent, act="elu"):
        super().__init__()
        Act = {"elu": nn.ELU, "relu": nn.ReLU}[act]
        self.latent = latent
        self.enc = nn.Sequential(nn.Linear(784 + 10, h1), Act(), nn.Linear(h1, h2), Act(), nn.Linear(h2, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent + 10, h2), Act(), nn.Linear(h2, h1), Act(), nn.Linear(h1, 784))

    def forward(self, x, y):
        c = F.one_hot(y, 10).to(x.dtype)
        mu, logvar = self.enc(torch.cat([x, c], 1)).split(self.latent, 1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(torch.cat([z, c], 1)), mu, logvar


class ConvCVAE(nn.Module):
    """The convolutional CVAE of issue 17, as cvae's `--variant conv` (benchmarks/README.md):
    conv 1->C1 and C1->C2 (4x4, stride 2, pad 1: 28->14->7), [flatten ; onehot] -> fc H -> fc 2L;
    [z ; onehot] -> fc H -> fc C2*49 -> transposed conv C2->C1 (7->14) -> transposed conv C1->1
    (14->28) -> 784 logits, act after every layer but the last of each half. PyTorch's default init."""

    def __init__(self, channels=(32, 64), hidden=512, latent=128, act="elu"):
        super().__init__()
        Act = {"elu": nn.ELU, "relu": nn.ReLU}[act]
        c1, c2 = channels
        self.latent = latent
        self.enc_conv = nn.Sequential(nn.Conv2d(1, c1, 4, 2, 1), Act(), nn.Conv2d(c1, c2, 4, 2, 1), Act())
        self.enc_fc = nn.Sequential(nn.Linear(c2 * 49 + 10, hidden), Act(), nn.Linear(hidden, 2 * latent))
        self.dec_fc = nn.Sequential(nn.Linear(latent + 10, hidden), Act(), nn.Linear(hidden, c2 * 49), Act())
        self.dec_conv = nn.Sequential(nn.ConvTranspose2d(c2, c1, 4, 2, 1), Act(), nn.ConvTranspose2d(c1, 1, 4, 2, 1))
        self.c2 = c2

    def forward(self, x, y):
        c = F.one_hot(y, 10).to(x.dtype)
        h = self.enc_conv(x.view(-1, 1, 28, 28)).flatten(1)
        mu, logvar = self.enc_fc(torch.cat([h, c], 1)).split(self.latent, 1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        h = self.dec_fc(torch.cat([z, c], 1)).view(-1, self.c2, 7, 7)
        return self.dec_conv(h).flatten(1), mu, logvar


def loss_fn(logits, x, mu, logvar, beta=1.0):
    """Mean over images of: BCE-with-logits summed over pixels + beta * KL(N(mu, exp(logvar)) || N(0, I))."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return (bce + beta * kl).mean()


def conv_arch(variant, channels=None, hidden=None, latent=None):
    """A conv variant's ((C1, C2), H, L) with the given overrides (None keeps the variant's)."""
    c, h, z, _ = CONV_VARIANTS[variant]
    return (tuple(channels) if channels else c), (hidden or h), (latent or z)


def make_model(variant, act="elu", lr=1e-3, arch=None, fused=False):
    """(model, Adam). arch: for a conv variant, conv_arch's ((C1, C2), H, L); None: its defaults.
    fused: torch.optim.Adam(fused=True), one kernel per parameter instead of the default
    multi-tensor ("foreach") one: the same update, PyTorch's fastest CPU Adam."""
    if variant in CONV_VARIANTS:
        channels, hidden, latent = arch or conv_arch(variant)
        model = ConvCVAE(channels, hidden, latent, act)
    else:
        h1, h2, latent, _ = VARIANTS[variant]
        model = CVAE(h1, h2, latent, act)
    return model, torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                   **({"fused": True} if fused else {}))


def autocast(precision):
    """bf16: forward and loss under CPU autocast (PyTorch picks which ops run in bf16; the weights,
    gradients and Adam state stay fp32), the usual mixed-precision recipe. fp32: nothing."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss(model, x, y, beta=1.0, precision="fp32"):
    """The batch loss: the forward pass and loss_fn, under autocast(precision)."""
    with autocast(precision):
        logits, mu, logvar = model(x, y)
        return loss_fn(logits, x, mu, logvar, beta)


def train_step(model, opt, x, y, beta=1.0, precision="fp32", forward=forward_loss):
    """One step: forward and loss, backward, Adam, zero_grad. forward: forward_loss, or
    torch.compile(forward_loss) (then inductor also compiles its backward)."""
    loss = forward(model, x, y, beta, precision)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def batches(n, batch, gen):
    """Endless shuffled minibatch indices (full batches only; reshuffle every pass)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


_interop_set = False


def set_threads(n):
    global _interop_set
    if not _interop_set:
        try:
            torch.set_num_interop_threads(1)  # allowed once, before any inter-op work
        except RuntimeError:
            pass
        _interop_set = True
    torch.set_num_threads(n)


def bench_torch(variant, batch, threads, steps, warmup, act="elu", lr=1e-3, seed=0, data=None,
                precision="fp32", stats=None, arch=None, fused=False, compile=False, channels_last=False):
    """Images/s over `steps` timed training steps, after `warmup` untimed ones. Only the step is timed
    (forward, loss, backward, optimizer.step, zero_grad); batch gathering from the float tensor is not.
    With a dict `stats`, also stores "cpu_per_wall": process CPU seconds per wall second over the
    timed steps (how many cores were busy, spinning included). arch and fused: see make_model;
    compile: the forward and loss through torch.compile (it compiles during the warmup, untimed);
    channels_last: the conv model's weights in torch.channels_last (NHWC) memory format."""
    set_threads(threads)
    torch.manual_seed(seed)
    x, y = data if data is not None else load_mnist("train", digits_of(variant))
    model, opt = make_model(variant, act, lr, arch, fused)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(forward_loss) if compile else forward_loss
    it = batches(len(x), batch, torch.Generator().manual_seed(seed))
    elapsed = cpu = 0.0
    for s in range(warmup + steps):
        idx = next(it)
        xb, yb = x[idx], y[idx]
        c0, t0 = time.process_time(), time.perf_counter()
        loss = train_step(model, opt, xb, yb, precision=precision, forward=forward)
        if s >= warmup:
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
    if not torch.isfinite(loss):
        raise SystemExit(f"torch_cvae: the loss diverged ({loss.item()})")
    if stats is not None:
        stats["cpu_per_wall"] = round(cpu / elapsed, 2)
    return steps * batch / elapsed


@torch.no_grad()
def test_neg_elbo(model, x, y, seed=0, chunk=1000):
    """Test negative ELBO at beta=1 in nats/image, one eps draw per image (seeded)."""
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    total = 0.0
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        logits, mu, logvar = model(xb, yb)
        total += loss_fn(logits, xb, mu, logvar, beta=1.0).item() * len(xb)
    torch.random.set_rng_state(state)
    model.train()
    return total / len(x)


def save_as_cvae(model, path, digits, act):
    """The model's weights as a cvae checkpoint (the same layers, in cvae's section names), so
    `cvae eval` can measure the reference with the same code and classifier as cvae's runs."""
    from cvae.checkpoint import save_checkpoint

    linears = [m for m in list(model.enc) + list(model.dec) if isinstance(m, nn.Linear)]
    names = ("enc1", "enc2", "enc3", "dec1", "dec2", "dec3")
    sections = {}
    for name, layer in zip(names, linears):
        sections[f"param.{name}.W"] = layer.weight.detach().numpy()
        sections[f"param.{name}.b"] = layer.bias.detach().numpy()
    h1, h2 = linears[0].out_features, linears[1].out_features
    meta = {"arch": {"h1": h1, "h2": h2, "latent": model.latent, "act": act},
            "digits": list(digits), "adam_t": 0, "source": "benchmarks/torch_cvae.py"}
    save_checkpoint(path, "cvae", meta, sections)


def train_torch(variant, epochs, batch, beta, threads, seed=0, act="elu", lr=1e-3, log=print,
                save_dir=None, precision="fp32", arch=None, fused=False):
    """Constant-beta training; after each epoch the test -ELBO (beta=1). The last batch of an epoch may be short.
    With save_dir, every epoch's weights go to save_dir/epoch-NNNN.cvae (see save_as_cvae).
    Returns (list of per-epoch test -ELBO, total seconds)."""
    set_threads(threads)
    torch.manual_seed(seed)
    digits = digits_of(variant)
    (x, y), (xt, yt) = load_mnist("train", digits), load_mnist("test", digits)
    model, opt = make_model(variant, act, lr, arch, fused)
    gen, history, t0 = torch.Generator().manual_seed(seed), [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            total += train_step(model, opt, x[idx], y[idx], beta, precision).item() * len(idx)
        history.append(test_neg_elbo(model, xt, yt, seed))
        log(epoch, total / len(x), history[-1], time.perf_counter() - t0)
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
            save_as_cvae(model, os.path.join(save_dir, f"epoch-{epoch:04d}.cvae"), digits, act)
    return history, time.perf_counter() - t0


def impl_name(precision="fp32", fused=False, compile=False, channels_last=False):
    """The record's "impl": torch, then -fused, -compile, -cl for what is on, then -bf16."""
    return "torch" + "-fused" * fused + "-compile" * compile + "-cl" * channels_last + (
        "" if precision == "fp32" else f"-{precision}")


def channel_pair(text):
    c = [int(v) for v in text.split(",")]
    if len(c) != 2 or min(c) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: two positive channel counts, C1,C2")
    return tuple(c)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("bench", "train"):
        q = sub.add_parser(name)
        q.add_argument("--variant", choices=(*VARIANTS, *CONV_VARIANTS), default="full")
        q.add_argument("--batch", type=int, default=64)
        q.add_argument("--act", choices=("elu", "relu"), default="elu")
        q.add_argument("--lr", type=float, default=1e-3)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--json", action="store_true", help="one JSON object per line")
        q.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="bf16: forward and loss under torch.autocast('cpu', torch.bfloat16)")
        q.add_argument("--fused", action="store_true",
                       help="torch.optim.Adam(fused=True) instead of the default (foreach) Adam")
        q.add_argument("--channels", type=channel_pair, default=None, metavar="C1,C2",
                       help="conv only: the two convolutions' channels (default 32,64)")
        q.add_argument("--hidden", type=int, default=None, help="conv only: the fc width H (default 512)")
        q.add_argument("--latent", type=int, default=None, help="conv only: the latent size L (default 128)")
    b, t = sub.choices["bench"], sub.choices["train"]
    b.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    b.add_argument("--steps", type=int, default=200, help="timed steps (after warmup)")
    b.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    b.add_argument("--compile", action="store_true",
                   help="the forward and loss through torch.compile (inductor); it compiles in the warmup")
    b.add_argument("--channels-last", action="store_true",
                   help="conv only: the model in torch.channels_last memory format")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--beta", type=float, default=1.0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--save-cvae", metavar="DIR", default=None,
                   help="write every epoch's weights as DIR/epoch-NNNN.cvae for `cvae eval` (MLP variants)")
    a = p.parse_args(argv)
    conv = a.variant in CONV_VARIANTS
    given = [f"--{k.replace('_', '-')}" for k in ("channels", "hidden", "latent", "channels_last")
             if getattr(a, k, None)]
    if given and not conv:
        p.error(f"{', '.join(given)}: only with a conv variant ({', '.join(CONV_VARIANTS)})")
    if conv and a.cmd == "train" and a.save_cvae:
        p.error("--save-cvae: only for the MLP variants (cvae's checkpoint sections are theirs)")
    if a.cmd == "bench" and a.compile and a.warmup < 1:
        p.error("--compile needs --warmup of at least 1 (the first step compiles, untimed)")
    arch = conv_arch(a.variant, a.channels, a.hidden, a.latent) if conv else None

    info = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if a.json:  # stdout carries only the records; the header goes to stderr
        print(json.dumps(info), file=sys.stderr, flush=True)
    else:
        print(f"torch {info['torch']}, CPU capability {info['cpu_capability']}", flush=True)
    impl = impl_name(a.precision, a.fused, getattr(a, "compile", False), getattr(a, "channels_last", False))
    shape = {"channels": list(arch[0]), "hidden": arch[1], "latent": arch[2]} if conv else {}
    if a.cmd == "bench":
        data = load_mnist("train", digits_of(a.variant))
        for n in thread_counts(a.threads):
            stats = {}
            ips = bench_torch(a.variant, a.batch, n, a.steps, a.warmup, a.act, a.lr, a.seed, data,
                              a.precision, stats, arch, a.fused, a.compile, a.channels_last)
            rec = {"impl": impl, "variant": a.variant, **shape, "batch": a.batch, "threads": n,
                   "img_per_s": round(ips, 1), "steps": a.steps, **stats}
            print(json.dumps(rec) if a.json else
                  f"{impl} {a.variant} batch {a.batch} threads {n}: {ips:.0f} img/s ({a.steps} steps, "
                  f"{stats['cpu_per_wall']} CPU s per s)", flush=True)
    else:
        def log(epoch, train_loss, test_nelbo, secs):
            rec = {"impl": impl, "variant": a.variant, "epoch": epoch, "train_loss": round(train_loss, 4),
                   "test_neg_elbo": round(test_nelbo, 4), "seconds": round(secs, 2)}
            print(json.dumps(rec) if a.json else f"epoch {epoch}: train loss (beta={a.beta:g}) {train_loss:.3f}, "
                  f"test -ELBO {test_nelbo:.3f} nats/image, {secs:.1f} s", flush=True)
        hist, secs = train_torch(a.variant, a.epochs, a.batch, a.beta, a.threads, a.seed, a.act, a.lr, log,
                                 save_dir=a.save_cvae, precision=a.precision, arch=arch, fused=a.fused)
        final = {"impl": impl, "variant": a.variant, **shape, "epochs": a.epochs, "batch": a.batch,
                 "beta": a.beta, "threads": a.threads, "seed": a.seed, "final_test_neg_elbo": round(hist[-1], 4),
                 "total_seconds": round(secs, 2)}
        print(json.dumps(final) if a.json else
              f"final test -ELBO {hist[-1]:.3f} nats/image after {a.epochs} epochs, total {secs:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
