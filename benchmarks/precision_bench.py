"""fp32 against bf16 training throughput, interleaved: img/s best and median per precision and
thread count.

    CVAE_DATA=/path/to/mnist python benchmarks/precision_bench.py --variant full --threads 1,2 \
        --rounds 5 --steps 300 --warmup 30

Each round runs every (precision, threads) once through cvae.bench.run_bench, in alternating
order (fp32 first in even rounds, bf16 first in odd ones), so a noisy neighbour on a shared
machine hits both precisions alike. Prints one JSON line per configuration.

--clock cpu (one thread only): images per second of this process's CPU time instead of wall
time, the same steps otherwise. Other processes taking the core away then cost nothing, so
on a crowded machine this still compares the two precisions' work per image (the caches
and memory bandwidth remain shared); quote it as img per CPU-second, never as img/s.
"""

import argparse
import json
import statistics
import sys
import time

from cvae.bench import parse_int_list, run_bench
from cvae.data import BatchStream, Dataset
from cvae.fetch import resolve_data_dir
from cvae.kernels import build_name, resolve_precision
from cvae.model import VARIANTS, Arch, Model


def cpu_time_rows(variant, batch, steps, warmup, data_dir, precision, _cache={}):
    """run_bench's row for one thread, timed by process CPU time (see --clock cpu)."""
    key = (variant, batch, precision)
    if key not in _cache:
        dataset = Dataset.load(data_dir, "train", VARIANTS[variant]["digits"])
        model = Model(Arch.variant(variant), max_batch=batch, threads=1, precision=precision)
        model.init_params(0)
        _cache[key] = (dataset, model)
    dataset, model = _cache[key]
    stream = BatchStream(dataset, batch, seed=0)
    done = images = 0
    start = None
    for epoch in range(10 ** 6):
        for pixels, labels in stream.epoch(epoch):
            if done == warmup:
                start = time.process_time()
            model.train_step(pixels, labels, 1e-3, 1.0, 0, done)
            images += pixels.shape[0] if done >= warmup else 0
            done += 1
            if done == warmup + steps:
                return [{"threads": 1, "img_per_s": images / (time.process_time() - start)}]


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
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: img/s (run_bench); cpu: img per CPU-second, one thread only")
    p.add_argument("--data", help="MNIST directory (default: $CVAE_DATA, else the cache)")
    args = p.parse_args(argv)
    threads = parse_int_list(args.threads, "--threads")
    if args.clock == "cpu" and threads != [1]:
        p.error("--clock cpu measures one thread only: use --threads 1")
    data_dir, _ = resolve_data_dir(args.data)
    precisions = ("fp32", "bf16")
    print(f"kernels: {build_name()}; bf16: {resolve_precision('bf16')[1]}", file=sys.stderr)
    rates = {(pr, t): [] for pr in precisions for t in threads}
    for r in range(args.rounds):
        for pr in precisions if r % 2 == 0 else precisions[::-1]:
            rows = (cpu_time_rows(args.variant, args.batch, args.steps, args.warmup, data_dir, pr)
                    if args.clock == "cpu" else
                    run_bench([args.variant], [args.batch], threads, args.steps, args.warmup, 1,
                              data_dir, precision=pr))
            for row in rows:
                rates[(pr, row["threads"])].append(row["img_per_s"])
                unit = "img/s" if args.clock == "wall" else "img per CPU-s"
                print(f"round {r + 1}: {pr} {row['threads']} threads {row['img_per_s']:,.0f} {unit}",
                      file=sys.stderr, flush=True)
    for t in threads:
        for pr in precisions:
            runs = rates[(pr, t)]
            print(json.dumps({"variant": args.variant, "batch": args.batch, "threads": t,
                              "precision": pr, "kernels": build_name(), "clock": args.clock,
                              "best": round(max(runs)), "median": round(statistics.median(runs)),
                              "runs": [round(x) for x in runs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
