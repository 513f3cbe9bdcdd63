"""cvae against its peers on the same model, batch, thread count and data, interleaved.

    python benchmarks/compare_peers.py --variant full --batch 64 --threads 1,2 --rounds 4 [--json]
    python benchmarks/compare_peers.py --variant conv --batch 64 --threads 1,2 --rounds 4 [--json]

Implementations (each run in its own process, one thread count per process):
  cvae-fp32, cvae-bf16  `cvae bench --repeat 1 --json [--precision P]` under --cvae-python
                        (bf16 only when `cvae bench --help` offers --precision; else one "cvae")
  jax                   benchmarks/jax_cvae.py bench --json (jax.jit + optax) under --peer-python
  torch                 benchmarks/torch_cvae.py bench --json (PyTorch eager fp32)
  torch-bf16            benchmarks/torch_cvae.py bench --precision bf16 --json (CPU autocast)
  torch-fused[-bf16]    the same with torch.optim.Adam(fused=True)
  torch-fused-compile[-bf16]  and the forward and loss through torch.compile
The default set is the variant's (PEERS below: the MLP variants' four, conv's PyTorch rows);
--impls picks others. Before the rounds, cvae runs one step of the variant, so a cvae without
it (say `--variant conv` before issue 17) stops the script with cvae's own message.

Every round runs each implementation once per thread count; the order of the implementations
turns by one place each round, so drift on the machine and any after-effect of the previous
process fall on all of them alike. Prints, per implementation and thread count, the best and
the median img/s of the rounds, then per thread count the ratio of cvae's best precision to the
best peer: best of bests, and median of medians. With --json, one object per line:
{"kind": "result", ...} per implementation and thread count, then {"kind": "ratio", ...}.
An implementation that fails at a thread count is dropped from that thread count's later rounds
and named at the end (its last stderr line; {"kind": "failed", ...} with --json); the exit code
is 1 when no thread count has both a cvae and a peer figure (with cvae left out of --impls: when
there is no figure at all).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER_PYTHON = "/work/bench-venv/bin/python"
MLP_VARIANTS, CONV_VARIANTS = ("full", "mini", "mid"), ("conv",)
# peer impl -> (script, its extra arguments); the record's "impl" is the same name
PEERS = {
    "jax": ("jax_cvae.py", []),
    "torch": ("torch_cvae.py", []),
    "torch-bf16": ("torch_cvae.py", ["--precision", "bf16"]),
    "torch-fused": ("torch_cvae.py", ["--fused"]),
    "torch-fused-bf16": ("torch_cvae.py", ["--fused", "--precision", "bf16"]),
    "torch-fused-compile": ("torch_cvae.py", ["--fused", "--compile"]),
    "torch-fused-compile-bf16": ("torch_cvae.py", ["--fused", "--compile", "--precision", "bf16"]),
}
# What --impls defaults to. The MLP set is the one README's Speed table was measured with. For
# conv, Adam is a large part of PyTorch's step (3.5M parameters) and its fused Adam is faster
# than the default one, so both are rows; torch.compile with bf16 was level with eager fused bf16
# on the busy machine (benchmarks/README.md), so it is a row too: the best peer sets the ratio.
DEFAULT_IMPLS = {"mlp": "cvae,jax,torch,torch-bf16",
                 "conv": "cvae,jax,torch,torch-bf16,torch-fused,torch-fused-bf16,torch-fused-compile-bf16"}


def cvae_has_precision(python):
    """Does this cvae's `bench` accept --precision? (read from its --help, so an older cvae works)."""
    out = subprocess.run([python, "-m", "cvae", "bench", "--help"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"compare_peers: `{python} -m cvae bench --help` failed: "
                         f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return "--precision" in out.stdout


def arch_args(args):
    """--channels/--hidden/--latent as given (conv only), passed alike to cvae and the peers."""
    out = []
    for name in ("channels", "hidden", "latent"):
        if getattr(args, name) is not None:
            out += [f"--{name}", str(getattr(args, name))]
    return out


def check_cvae_variant(args):
    """One untimed step of `cvae bench` on this variant, so that a cvae without it (or without
    the arch options given) stops the script now, with cvae's own message, not after the peers ran."""
    argv = [args.cvae_python, "-m", "cvae", "bench", "--variant", args.variant, "--batch", str(args.batch),
            "--steps", "1", "--warmup", "0", "--repeat", "1", "--threads", "1", "--json"] + arch_args(args)
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode:
        why = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        raise SystemExit(f"compare_peers: this cvae ({args.cvae_python}) cannot run `cvae bench --variant "
                         f"{args.variant}{' ' if arch_args(args) else ''}{' '.join(arch_args(args))}`: {why}")


def commands(args, threads):
    """{impl: argv} for one thread count, in the base order."""
    common = ["--variant", args.variant, "--batch", str(args.batch), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--threads", str(threads), "--json"] + arch_args(args)
    cvae = [args.cvae_python, "-m", "cvae", "bench", "--repeat", "1"] + common
    out = {}
    if args.cvae_precisions:
        for precision in args.cvae_precisions:
            out[f"cvae-{precision}"] = cvae + ["--precision", precision]
    else:
        out["cvae"] = cvae
    for impl, (script, extra) in PEERS.items():
        out[impl] = [args.peer_python, os.path.join(HERE, script), "bench"] + common + extra
    return {impl: argv for impl, argv in out.items()
            if impl in args.impls or (is_cvae(impl) and "cvae" in args.impls)}


def run_one(argv):
    """-> (img/s, record) or (None, the last stderr line)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as e:
        return None, f"cannot run {argv[0]}: {e.strerror}"
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not records:
        return None, (done.stderr.strip().splitlines() or [f"exit code {done.returncode}, no record"])[-1]
    return records[0]["img_per_s"], records[0]


def is_cvae(impl):
    return impl.startswith("cvae")


def summarise(args, threads, rates):
    """Rows for the result table and the ratios, as dicts."""
    rows, ratios = [], []
    given = {k: getattr(args, k) for k in ("channels", "hidden", "latent") if getattr(args, k) is not None}
    for t in threads:
        best, median = {}, {}
        for impl, runs in rates[t].items():
            if not runs:
                continue
            best[impl], median[impl] = max(runs), statistics.median(runs)
            rows.append({"kind": "result", "impl": impl, "variant": args.variant, **given, "batch": args.batch,
                         "threads": t, "best": round(best[impl], 1), "median": round(median[impl], 1),
                         "runs": runs})
        ours = [i for i in best if is_cvae(i)]
        peers = [i for i in best if not is_cvae(i)]
        if ours and peers:
            ob, pb = max(ours, key=best.get), max(peers, key=best.get)
            om, pm = max(ours, key=median.get), max(peers, key=median.get)
            ratios.append({"kind": "ratio", "variant": args.variant, **given, "batch": args.batch, "threads": t,
                           "best_ratio": round(best[ob] / best[pb], 3), "cvae_best": ob, "peer_best": pb,
                           "median_ratio": round(median[om] / median[pm], 3), "cvae_median": om,
                           "peer_median": pm, "rounds": args.rounds})
    return rows, ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=MLP_VARIANTS + CONV_VARIANTS, default="full")
    p.add_argument("--channels", default=None, metavar="C1,C2", help="conv only (default: the variant's)")
    p.add_argument("--hidden", type=int, default=None, help="conv only (default: the variant's)")
    p.add_argument("--latent", type=int, default=None, help="conv only (default: the variant's)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first in every run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--impls", default=None,
                   help="which to run, comma-separated (cvae means all its precisions); default: "
                        + "; ".join(f"{k} variants {v}" for k, v in DEFAULT_IMPLS.items())
                        + f"; peers: {', '.join(PEERS)}")
    p.add_argument("--cvae-python", default=sys.executable,
                   help="the Python where cvae is installed (default: this one)")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help=f"the Python with torch, jax and optax (default: {DEFAULT_PEER_PYTHON})")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be positive and --warmup not negative")
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    conv = args.variant in CONV_VARIANTS
    if not conv and arch_args(args):
        p.error(f"{' '.join(arch_args(args)[::2])}: only with --variant {'/'.join(CONV_VARIANTS)}")
    impls = args.impls or DEFAULT_IMPLS["conv" if conv else "mlp"]
    args.impls = {s.strip() for s in impls.split(",") if s.strip()}
    unknown = sorted(args.impls - set(PEERS) - {"cvae"})
    if unknown:
        p.error(f"--impls {','.join(unknown)}: not an implementation (cvae, {', '.join(PEERS)})")
    for name in ("cvae_python", "peer_python"):
        path = getattr(args, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            p.error(f"--{name.replace('_', '-')} {path}: not an executable file"
                    + (" (see benchmarks/README.md to make the benchmark venv)" if name == "peer_python" else ""))
    args.cvae_precisions = ["fp32", "bf16"] if cvae_has_precision(args.cvae_python) else []
    if "cvae" in args.impls:
        check_cvae_variant(args)

    plans = {t: commands(args, t) for t in threads}
    rates = {t: {impl: [] for impl in plans[t]} for t in threads}
    failed = {}
    for r in range(args.rounds):
        for t in threads:
            order = list(plans[t])
            order = order[r % len(order):] + order[:r % len(order)]
            for impl in order:
                if (impl, t) in failed:
                    continue
                ips, rec = run_one(plans[t][impl])
                if ips is None:
                    failed[(impl, t)] = rec
                    continue
                rates[t][impl].append(ips)
                if not args.json:
                    print(f"  round {r + 1} threads {t} {impl}: {ips:,.0f} img/s", file=sys.stderr, flush=True)

    rows, ratios = summarise(args, threads, rates)
    if args.json:
        for row in rows + ratios:
            print(json.dumps(row))
    else:
        print(f"{args.variant}{' ' if arch_args(args) else ''}{' '.join(arch_args(args))}, batch {args.batch}, {args.steps} timed steps after {args.warmup}, "
              f"{args.rounds} interleaved rounds; img/s")
        width = max([12] + [len(row["impl"]) + 2 for row in rows])
        print(f"{'impl':<{width}}{'threads':>8}{'best':>10}{'median':>10}  runs")
        for row in rows:
            print(f"{row['impl']:<{width}}{row['threads']:>8}{row['best']:>10,.0f}{row['median']:>10,.0f}  "
                  f"{', '.join(f'{x:,.0f}' for x in row['runs'])}")
        for q in ratios:
            print(f"threads {q['threads']}: cvae / best peer = {q['best_ratio']:.2f}x best "
                  f"({q['cvae_best']} vs {q['peer_best']}), {q['median_ratio']:.2f}x median "
                  f"({q['cvae_median']} vs {q['peer_median']})")
    for (impl, t), why in failed.items():
        if args.json:
            print(json.dumps({"kind": "failed", "impl": impl, "threads": t, "error": why}))
        print(f"compare_peers: {impl} at {t} threads failed and was dropped: {why}", file=sys.stderr)
    # A peers-only run (--impls without cvae) succeeds with figures; otherwise a ratio is the point.
    return 0 if ratios or (rows and "cvae" not in args.impls) else 1


if __name__ == "__main__":
    sys.exit(main())
