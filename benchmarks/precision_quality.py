"""A quick quality check of bf16 against fp32: the same model, seed and batches trained for a
few epochs in each precision; prints the last epoch's mean training loss, the test -ELBO (in
fp32 and in the precision it trained in) and the non-finite count of the last Adam step.

    CVAE_DATA=/path/to/mnist python benchmarks/precision_quality.py --epochs 2 --threads 2

Not the issue's 30-epoch quality guard (that goes through `cvae train --precision`); this
only shows that bf16 training does not break.
"""

import argparse
import json
import sys

import numpy as np

from cvae.data import BatchStream, Dataset
from cvae.evaluate import test_elbo
from cvae.fetch import resolve_data_dir
from cvae.kernels import build_name
from cvae.model import VARIANTS, Arch, Model


def train(arch, precision, train_set, epochs, batch, threads, lr, seed):
    model = Model(arch, max_batch=batch, threads=threads, precision=precision)
    model.init_params(seed)
    stream = BatchStream(train_set, batch, seed=seed)
    step, last = 0, []
    for epoch in range(epochs):
        last = []
        for pixels, labels in stream.epoch(epoch):
            loss, _, _ = model.train_step(pixels, labels, lr, 1.0, seed, step)
            last.append(loss)
            step += 1
    return model, float(np.mean(last)), step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="full")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="MNIST directory (default: $CVAE_DATA, else the cache)")
    args = p.parse_args(argv)
    data_dir, _ = resolve_data_dir(args.data)
    digits = VARIANTS[args.variant]["digits"]
    train_set = Dataset.load(data_dir, "train", digits)
    test_set = Dataset.load(data_dir, "test", digits)
    arch = Arch.variant(args.variant)
    for precision in ("fp32", "bf16"):
        model, train_loss, steps = train(arch, precision, train_set, args.epochs, args.batch,
                                         args.threads, args.lr, args.seed)
        own = test_elbo(model, test_set, args.seed)[0]
        judge = Model(arch, max_batch=args.batch, threads=args.threads)  # fp32 evaluation
        judge.load_state_sections(model.state_sections(optimizer=False))
        fp32_eval = test_elbo(judge, test_set, args.seed)[0]
        print(json.dumps({"variant": args.variant, "precision": precision, "kernels": build_name(),
                          "epochs": args.epochs, "steps": steps,
                          "last_epoch_train_loss": round(train_loss, 3),
                          "test_neg_elbo": round(own, 3), "test_neg_elbo_fp32_eval": round(fp32_eval, 3),
                          "nonfinite": model.nonfinite()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
