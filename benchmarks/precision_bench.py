"""fp32 against bf16 training throughput, interleaved: img/s best and median per precision and
thread count.

    CVAE_DATA=/path/to/mnist python benchmarks/precision_bench.py --variant full --threads 1,2 \
        --rounds 5 --steps 300 --warmup 30

Each round runs every (precision, threads) once through cvae.bench.run_bench, in alternating
order (fp32 first in even rounds, bf16 first in odd ones), so a noisy neighbour on a shared
machine hits both precisions alike. Prints one JSON line per configuration.
"""

import argparse
import json
import statistics
import sys

from cvae.bench import parse_int_list, run_bench
from cvae.fetch import resolve_data_dir
from cvae.kernels import build_name, resolve_precision


def main(argv=None):
    try:  # as `cvae` does: OpenMP (the kernels) is the only pool; numpy's BLAS stays at one
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="full")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--data", help="MNIST directory (default: $CVAE_DATA, else the cache)")
    args = p.parse_args(argv)
    threads = parse_int_list(args.threads, "--threads")
    data_dir, _ = resolve_data_dir(args.data)
    precisions = ("fp32", "bf16")
    print(f"kernels: {build_name()}; bf16: {resolve_precision('bf16')[1]}", file=sys.stderr)
    rates = {(pr, t): [] for pr in precisions for t in threads}
    for r in range(args.rounds):
        for pr in precisions if r % 2 == 0 else precisions[::-1]:
            for row in run_bench([args.variant], [args.batch], threads, args.steps, args.warmup,
                                 1, data_dir, precision=pr):
                rates[(pr, row["threads"])].append(row["img_per_s"])
                print(f"round {r + 1}: {pr} {row['threads']} threads {row['img_per_s']:,.0f} img/s",
                      file=sys.stderr, flush=True)
    for t in threads:
        for pr in precisions:
            runs = rates[(pr, t)]
            print(json.dumps({"variant": args.variant, "batch": args.batch, "threads": t,
                              "precision": pr, "kernels": build_name(),
                              "best": round(max(runs)), "median": round(statistics.median(runs)),
                              "runs": [round(x) for x in runs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
