"""The flow prior's settings, measured: for a trained CVAE run, train a prior per setting and
judge its samples as `cvae eval` does (conditional accuracy at T = 1, FID, diversity), with
the sampling settings given. Each line of output is one JSON object.

    python benchmarks/prior_choices.py --checkpoint runs/full --data $CVAE_DATA \
        --train hidden=256,blocks=3,epochs=30 --sample steps=10,method=heun

--train and --sample take comma-separated KEY=VALUE settings and may repeat; every --train
setting is sampled with every --sample setting. N(0, I) is measured once for comparison.
Trained priors are written to OUT/prior-<n>.cvae (default: a temporary directory).
--run-prior samples the run's own prior.cvae instead of training any. --oracle judges, instead,
the best any prior of these codes could do: the codes of real training images of the asked
digit (the aggregate posterior q(z | y)), drawn as mu + sigma eps and as mu alone.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def settings(text):
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key] = value if key in ("method", "act") else float(value) if "." in value else int(value)
    return out


class TrainingCodes:
    """A 'prior' that draws, for each asked digit, the code of a random training image of that
    digit: mu + sigma eps (noise) or mu. No prior trained on these codes can do better."""

    name = "training codes"

    def __init__(self, mu, logvar, labels, noise):
        self.mu, self.sigma, self.noise = mu, np.exp(0.5 * logvar), noise
        self.by_digit = {int(d): np.flatnonzero(labels == d) for d in np.unique(labels)}

    def draw(self, labels, rng, temperature):
        rows = np.empty(len(labels), dtype=np.int64)
        for digit, members in self.by_digit.items():
            asked = np.flatnonzero(labels == digit)
            rows[asked] = members[rng.integers(0, len(members), len(asked))]
        z = self.mu[rows].copy()
        if self.noise:
            z += self.sigma[rows] * rng.standard_normal(z.shape, dtype=np.float32)
        return z


def main():
    from cvae import prior as P
    from cvae import rundir as R
    from cvae.checkpoint import save_checkpoint
    from cvae.classifier import classifier_for
    from cvae.data import Dataset
    from cvae.evaluate import judge_samples, test_diversity
    from cvae.model import encode_all
    from cvae.train_prior import train_prior

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=os.environ.get("CVAE_DATA"))
    parser.add_argument("--train", action="append", type=settings, default=None)
    parser.add_argument("--sample", action="append", type=settings, default=None)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the judged draws")
    parser.add_argument("--run-prior", action="store_true",
                        help="judge the run's prior.cvae with each --sample setting")
    parser.add_argument("--oracle", action="store_true",
                        help="judge the codes of real training images of each digit instead")
    args = parser.parse_args()

    path, run_dir = R.resolve_checkpoint(args.checkpoint)
    model, meta = R.open_model(path, args.threads)
    digits = R.checkpoint_digits(meta, path)
    train_set = Dataset.load(args.data, "train", digits)
    test_set = Dataset.load(args.data, "test", digits)
    judge, _, _ = classifier_for(test_set, None, args.threads)
    out = args.out or tempfile.mkdtemp(prefix="prior-choices-")

    def report(**fields):
        print(json.dumps(fields), flush=True)

    def judged(sampler):
        start = time.perf_counter()
        r = judge_samples(model, judge, digits, args.samples, 1.0, args.eval_seed, test_set,
                          sampler)
        worst = min(r["cond_accuracy_per_digit"].items(), key=lambda kv: kv[1])
        return {"accuracy": round(r["cond_accuracy"], 4), "worst_digit": worst[0],
                "worst": round(worst[1], 4), "fid": round(r["fid"], 3),
                "fid_floor": round(r["fid_test_floor"], 3), "diversity": round(r["diversity"], 3),
                "judge_seconds": round(time.perf_counter() - start, 1)}

    report(prior="gaussian", diversity_test=round(test_diversity(judge, test_set, digits)[0], 3),
           **judged(P.GaussianPrior(model.arch.latent)))

    if args.oracle:
        mu, logvar = encode_all(model, train_set.images, train_set.labels)
        for noise in (True, False):
            report(prior="oracle: training codes " + ("mu + sigma eps" if noise else "mu"),
                   **judged(TrainingCodes(mu, logvar, train_set.labels, noise)))
        return

    def train_one(n, train):
        """(settings, prior, file, seconds, final loss) of a prior trained with `train`."""
        file = os.path.join(out, f"prior-{n}.cvae")
        start = time.perf_counter()
        def save(meta, sections):
            save_checkpoint(file, P.KIND, meta, sections)

        trainer = train_prior(model, train_set, save,
                                epochs=train.get("epochs", P.DEFAULT_EPOCHS),
                                batch=train.get("batch", P.DEFAULT_BATCH),
                                lr=train.get("lr", P.DEFAULT_LR),
                                drop=train.get("drop", P.DEFAULT_DROP), seed=train.get("seed", 0),
                                threads=args.threads,
                                **{k: train[k] for k in ("hidden", "blocks", "n_freq", "act")
                                   if k in train})
        trainer.run()
        return train, trainer.prior, file, time.perf_counter() - start, trainer.losses[-1]

    if args.run_prior:
        prior, meta = P.load_prior(R.prior_path(run_dir), model, args.threads)
        trained = [({"run_prior": R.prior_path(run_dir)}, prior, R.prior_path(run_dir), None,
                    meta["epoch_losses"][-1])]
    else:
        trained = (train_one(n, train) for n, train in enumerate(args.train or [{}]))
    for train, prior, file, seconds, loss in trained:
        for sample in args.sample or [{}]:
            sampler = P.FlowSampler(prior, file, latent=model.arch.latent,
                                    steps=sample.get("steps", P.DEFAULT_STEPS),
                                    method=sample.get("method", P.DEFAULT_METHOD),
                                    guidance=sample.get("guidance", P.DEFAULT_GUIDANCE))
            labels = np.repeat(np.arange(10, dtype=np.uint8), 1000)
            t0 = time.perf_counter()
            sampler.draw(labels, np.random.default_rng(0), 1.0)
            ode = time.perf_counter() - t0
            report(prior="flow", train=train, sample=sample, params=prior.arch.n_params(),
                   dims=prior.arch.latent, train_seconds=seconds and round(seconds, 1),
                   final_loss=round(loss, 4), ode_seconds_10k=round(ode, 2), **judged(sampler))


if __name__ == "__main__":
    sys.exit(main())
