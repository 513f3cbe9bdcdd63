"""The flow prior's sampling alone: seconds to carry N(0, I) draws of --codes codes through a
run's prior (FlowSampler.from_normals, the run's precision and default solver), in sheets
of --sheet codes as `cvae generate` does, best and median of --rounds, for each thread count.
No decoding, no writing: benchmarks/prior_speed.sh times the whole command.

    python benchmarks/flow_sampling.py --checkpoint RUN [--threads 1,2] [--codes 100000] [--rounds 5]
"""
import argparse
import os
import statistics
import time

import numpy as np

from cvae.rundir import open_model, open_prior


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory with prior.cvae")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--codes", type=int, default=100_000)
    p.add_argument("--sheet", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    labels = (np.arange(a.codes) * 10 // a.codes).astype(np.uint8)
    for threads in map(int, a.threads.split(",")):
        model, _ = open_model(os.path.join(a.checkpoint, "last.cvae"), threads=threads)
        sampler = open_prior("flow", a.checkpoint, model, threads=threads)
        z = np.random.default_rng(0).standard_normal((a.codes, model.arch.latent),
                                                     dtype=np.float32)
        times = []
        for _ in range(a.rounds):
            start = time.perf_counter()
            for i in range(0, a.codes, a.sheet):
                sampler.from_normals(z[i:i + a.sheet].copy(), labels[i:i + a.sheet], 1.0)
            times.append(time.perf_counter() - start)
        print(f"{threads} thread(s), {a.codes:,} codes in sheets of {a.sheet}: best "
              f"{min(times):.3f} s, median {statistics.median(times):.3f} s "
              f"(runs {', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
