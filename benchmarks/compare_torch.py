"""cvae vs the PyTorch peer on the same model, batch, thread count and data, interleaved.

    python benchmarks/compare_torch.py --variant full --batch 64 --threads 1,2 --rounds 3

Each round runs `cvae bench --json` and `torch_cvae.py bench --json` once per thread count,
each in its own process (two OpenMP runtimes in one process would fight), alternating
cvae, torch, cvae, torch... so drift on a shared machine hits both alike. Prints the median
img/s of each, their ratio, and one JSON object per line with --json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="full")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    common = ["--variant", args.variant, "--batch", str(args.batch), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--json"]
    rates = {(impl, t): [] for impl in ("cvae", "torch") for t in threads}
    for _ in range(args.rounds):
        for t in threads:
            ours = run_json([sys.executable, "-m", "cvae", "bench", "--repeat", "1", "--threads", str(t)] + common)
            rates[("cvae", t)].append(ours[0]["img_per_s"])
            peer = run_json([sys.executable, os.path.join(HERE, "torch_cvae.py"), "bench", "--threads", str(t)] + common)
            rates[("torch", t)].append(peer[0]["img_per_s"])
    for t in threads:
        ours, peer = statistics.median(rates[("cvae", t)]), statistics.median(rates[("torch", t)])
        row = {"variant": args.variant, "batch": args.batch, "threads": t, "cvae_img_per_s": round(ours, 1),
               "torch_img_per_s": round(peer, 1), "ratio": round(ours / peer, 3),
               "cvae_runs": rates[("cvae", t)], "torch_runs": rates[("torch", t)]}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{args.variant} batch {args.batch} threads {t}: cvae {ours:,.0f} img/s, "
                  f"torch {peer:,.0f} img/s, ratio {ours / peer:.2f}x  (runs: cvae {rates[('cvae', t)]}, torch {rates[('torch', t)]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
