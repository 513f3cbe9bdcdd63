"""Writes the seed corpus of every fuzz target into tests/fuzz/corpus/<target>/ (committed).

    python tests/fuzz/make_corpus.py

Tiny valid files made by cvae's own writers (and a few hand-made variants), so the fuzzer
starts from inputs that get past the first checks. Run again after a format change.
"""

import gzip
import json
import os
import struct
import sys
import tempfile

import numpy as np


import targets  # this script's own directory is on sys.path
from cvae.checkpoint import DIGEST_SIZE, save_checkpoint  # noqa: E402


def idx_seeds():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    image_file = b"\x00\x00\x08\x03" + struct.pack(">III", 2, 28, 28) + images.tobytes()
    label_file = b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([0, 7, 9])
    empty = b"\x00\x00\x08\x01" + struct.pack(">I", 0)
    # First byte: images 0-2, labels 3-5; raw file, gzipped by the check, as it is under .gz.
    return {"images-raw": b"\x00" + image_file, "images-gz": b"\x01" + image_file,
            "labels-raw": b"\x03" + label_file, "labels-empty": b"\x03" + empty,
            "labels-gz": b"\x04" + label_file,
            "labels-gzip-stream": b"\x05" + gzip.compress(label_file, mtime=0)}


def pgm_seeds():
    from cvae.images import pgm_bytes

    image = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    return {"plain": pgm_bytes(image),
            "comments": b"P5 # made by hand\n3\t2\n# maxval next\n255\n" + image.tobytes(),
            "whitespace-pixel": b"P5\n1 1\n255\n\n"}


def body(kind, meta, sections):
    """A checkpoint as cvae writes it, without its digest (the check reseals it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.cvae")
        save_checkpoint(path, kind, meta, sections)
        with open(path, "rb") as f:
            return f.read()[:-DIGEST_SIZE]


def cvae_seeds():
    from cvae.model import Arch, Model
    from cvae.schedule import make_schedule
    from cvae.train import Plan

    arch = Arch(**targets.TINY_CVAE)
    model = Model(arch, max_batch=16)
    model.init_params(0)
    plan = Plan(arch=arch, digits=(0, 1, 7), schedule=make_schedule("progressive", 1e-3),
                epochs=3, seed=5, batch=16, lr=1e-3,
                data={"name": "MNIST", "train_images": 48, "test_images": 16},
                epoch=1, batch_in_epoch=1, step=4, epoch_sums=[16, 9.5, 8.0, 1.5])
    model.adam_t = 4
    return {"exported": body("cvae", {"arch": arch.to_json(), "digits": list(range(10))},
                             model.state_sections(optimizer=False)),
            "training": body("cvae", plan.meta(model.adam_t), model.state_sections())}


def prior_seeds():
    from cvae.prior import FlowPrior, PriorArch, cvae_digest
    from cvae.train_prior import PriorPlan

    model = targets.prior_world()
    arch = PriorArch(latent=2, hidden=4, blocks=1, n_freq=1, dims=(0, 2))
    prior = FlowPrior(arch, max_batch=16)
    prior.init_params(3)
    prior.adam_t = 6
    plan = PriorPlan(arch=arch, cvae_sha256=cvae_digest(model), cvae_checkpoint="last.cvae",
                     epochs=2, batch=16, lr=1e-3, drop=0.1, seed=0, step=6, complete=True)
    return {"complete": body("prior", plan.meta(prior.adam_t, [1.5, 1.25]),
                             prior.state_sections())}


def classifier_seeds():
    from cvae.classifier import ClassifierArch, DigitClassifier

    arch = ClassifierArch(h1=3, h2=2)
    model = DigitClassifier(arch, max_batch=16)
    model.init_params(0)
    meta = {"arch": arch.to_json(), "seed": 0, "epochs": 1, "test_accuracy": 0.5,
            "test_digest": "0" * 64}
    return {"shipped-like": body("classifier", meta, model.state_sections(optimizer=False))}


def rundir_json_seeds():
    """A run's real JSON files: one of each (the first byte picks which, see
    targets.RUN_JSON)."""
    config = {"arch": {"h1": 32, "h2": 16, "latent": 4, "act": "elu"}, "digits": [0, 1],
              "epochs": 2, "prior": "flow", "data_dir": "/nonexistent", "keep": 3}
    metrics = "".join(json.dumps({"epoch": e, "step": 13 * e, "phase": "QUALITY", "beta": 1.0,
                                  "lr": 1e-3, "train_loss": 150.0 - e, "test_neg_elbo": 140.0,
                                  "img_per_s": 1e4, "seconds": 0.5}) + "\n" for e in (1, 2))
    figures = {"cond_accuracy": 0.9, "cond_accuracy_per_digit": {"0": 0.95, "1": 0.85},
               "fid": 3.2, "fid_test_floor": 0.7, "diversity": 11.5,
               "diversity_per_digit": {"0": 11.0, "1": 12.0}}
    evaluation = {"neg_elbo": 91.8, "rec": 72.3, "kl": 19.5, "iwae_nll": 88.9, "k": 100,
                  "ssim": 0.91, "ssim_per_digit": {"0": 0.9, "1": 0.92}, "temperature": 1.0,
                  "prior": "flow", "checkpoint": "last.cvae", "seed": 0, "classifier": None,
                  "samples": 1000, "diversity_test": 12.4, **figures,
                  "by_prior": {"flow": {"prior": "flow", "steps": 2, "method": "midpoint",
                                        "guidance": 2.0, **figures},
                               "gaussian": {"prior": "gaussian", **figures}}}
    sidecar = {"rows": 1, "cols": 1, "cell": 28, "gutter": 2, "width": 28, "height": 28,
               "extra": {"what": "samples", "seed": 0, "checkpoint": "last.cvae"},
               "cells": [{"x": 0, "y": 0, "row": 0, "col": 0, "index": 0, "label": 0}]}
    texts = (json.dumps(config), metrics, json.dumps(evaluation), json.dumps(sidecar))
    return {name.replace(".", "-"): bytes([k]) + text.encode()
            for k, (name, text) in enumerate(zip(targets.RUN_JSON, texts))}


SEEDS = {"idx": idx_seeds, "pgm": pgm_seeds, "checkpoint_cvae": cvae_seeds,
         "checkpoint_prior": prior_seeds, "checkpoint_classifier": classifier_seeds,
         "rundir_json": rundir_json_seeds}


def main():
    targets.STRICT = True
    for target, make in SEEDS.items():
        directory = os.path.join(targets.CORPUS, target)
        os.makedirs(directory, exist_ok=True)
        # Only the seeds are remade; inputs that once crashed a reader (crash-*, regression-*)
        # stay in the corpus for good.
        for name in os.listdir(directory):
            if name.startswith("seed-"):
                os.unlink(os.path.join(directory, name))
        for name, data in make().items():
            with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
                f.write(data)
            targets.TARGETS[target](data)  # every seed is read without an error
    print(f"wrote the seeds of {len(SEEDS)} targets into {targets.CORPUS}")


if __name__ == "__main__":
    main()
