"""Training speed of the convolutional CVAE (issue 17) on the kernels: img/s of
Model(ConvArch(), max_batch=B, threads=T).train_step on real MNIST training digits, best of
--runs runs of --steps steps (after --warmup untimed ones), for each thread count and
precision. Best of, not median: the machine is shared, and the best run is the one least
disturbed by others. Until `cvae bench --variant conv` exists, this is the conv model's
speed figure; compare with benchmarks/torch_cvae.py's conv model run side by side.

    CVAE_DATA=/work/shared/data/mnist python benchmarks/conv_step.py --threads 1,2
"""

import argparse
import os
import time

import numpy as np

from cvae.data import Dataset
from cvae.kernels import build_name
from cvae.model import Arch, ConvArch, Model


def rate(model, pixels, labels, batch, steps, warmup):
    """(img/s of wall time, img per second of the process's CPU time)."""
    n = len(labels) // batch
    for step in range(warmup + steps):
        if step == warmup:
            start, cpu = time.perf_counter(), time.process_time()
        i = (step % n) * batch
        model.train_step(pixels[i:i + batch], labels[i:i + batch], 1e-3, 1.0, 0, step)
    return (steps * batch / (time.perf_counter() - start),
            steps * batch / (time.process_time() - cpu))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--mlp", action="store_true", help="the MLP full variant instead")
    args = p.parse_args()
    data = Dataset.load(os.environ["CVAE_DATA"], "train", tuple(range(10)))
    pixels = np.ascontiguousarray(data.images[:6400])
    labels = np.ascontiguousarray(data.labels[:6400])
    arch = Arch.variant("full") if args.mlp else ConvArch()
    print(f"{arch.describe()}, batch {args.batch}, kernels {build_name()}, "
          f"best of {args.runs} runs of {args.steps} steps")
    for precision in args.precision.split(","):
        models = {int(t): Model(arch, max_batch=args.batch, threads=int(t), precision=precision)
                  for t in args.threads.split(",")}
        for m in models.values():
            m.init_params(0)
        best = {t: (0.0, 0.0) for t in models}
        for _ in range(args.runs):   # thread counts interleaved: a noisy neighbour hits all
            for t, m in models.items():
                r = rate(m, pixels, labels, args.batch, args.steps, args.warmup)
                best[t] = tuple(map(max, best[t], r))
        # Per CPU second: on 1 thread, what an idle core would do (a busy machine takes wall
        # time, not CPU time); on more, spinning threads count too, so only wall time says.
        for t, (wall, cpu) in best.items():
            print(f"{precision} threads {t}: {wall:,.0f} img/s"
                  + (f" ({cpu:,.0f} img per CPU second)" if t == 1 else ""))


if __name__ == "__main__":
    main()
