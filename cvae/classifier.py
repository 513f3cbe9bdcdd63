"""The project's own digit classifier: the judge of conditional accuracy and the feature
space of the FID (`cvae eval`).

An MLP, pixels/255 -> 512 -> 256 -> 10 class logits (ReLU), trained with softmax
cross-entropy and Adam by the same kernels as the CVAE (cvae._kernels.Classifier) over its
own slab. Training shifts every image by a random whole-pixel offset in [-2, 2]² (zero fill):
without it the MLP stops near 98.2% on the MNIST test set. The learning rate follows a
cosine from lr to 0. For a seed the result is deterministic (the kernels give the same bits
for any thread count; shuffling and shifts come from numpy's default_rng(seed)).

The classifier for MNIST ships in the package (assets/mnist-classifier.cvae, parameters
only, about 2 MB), made by the command in the README. Its header records a digest of the
test set it was measured on; `cvae eval` uses it by default only on that test set.
"""

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from cvae.checkpoint import header_int, load_checkpoint, save_checkpoint
from cvae.data import IMAGE_SIDE, NUM_DIGITS, PIXELS_PER_IMAGE
from cvae.errors import CvaeError
from cvae.model import (ACTIVATIONS, MAX_WIDTH, SlabModel, check_sizes,
                        check_state_sections)

KIND = "classifier"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                       "mnist-classifier.cvae")
MAX_SHIFT = 2
DEFAULT_EPOCHS = 20
DEFAULT_BATCH = 128
DEFAULT_LR = 1e-3
PREDICT_BATCH = 256


@dataclass(frozen=True)
class ClassifierArch:
    h1: int = 512
    h2: int = 256
    act: str = "relu"
    x_dim: int = PIXELS_PER_IMAGE
    n_classes: int = NUM_DIGITS

    def layers(self):
        """(name, n_in, n_out) of the three linear layers."""
        return (("fc1", self.x_dim, self.h1), ("fc2", self.h1, self.h2),
                ("fc3", self.h2, self.n_classes))

    def to_json(self):
        return dict(h1=self.h1, h2=self.h2, act=self.act)

    @classmethod
    def from_json(cls, data, source):
        if not (isinstance(data, dict) and {"h1", "h2", "act"} <= data.keys()):
            raise CvaeError(f"{source}: no valid classifier architecture in its header")
        if (not all(type(data[k]) is int and 1 <= data[k] <= MAX_WIDTH for k in ("h1", "h2"))
                or data["act"] not in ACTIVATIONS):
            raise CvaeError(f"{source}: its header's architecture {data!r:.120} is not one cvae "
                            f"can build")
        return cls(h1=data["h1"], h2=data["h2"], act=data["act"])


def check_checkpoint(meta, sections, path):
    """The validation of a classifier file (kind "classifier"), run by load_checkpoint."""
    arch = ClassifierArch.from_json(meta.get("arch"), path)
    check_sizes(arch.layers(), PREDICT_BATCH, path)
    check_state_sections(arch.layers(), sections, path)
    header_int(meta, "adam_t", path, required=False)


class DigitClassifier(SlabModel):
    """The classifier's slab and the kernels' Classifier over it."""

    def __init__(self, arch=ClassifierArch(), max_batch=PREDICT_BATCH, threads=1):
        if arch.act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.arch = arch
        self.source = "the classifier"  # its file once loaded, for error messages
        rows = {"x": arch.x_dim, "fc1": arch.h1, "fc2": arch.h2, "fc3": arch.n_classes}
        k = self._carve(arch.layers(), rows, ("fc1", "fc2", "fc3"), ("loss",), max_batch,
                        threads)
        self.net = k.Classifier(self.slab, self.layout, arch.layers(), self.max_bp, arch.act,
                                threads)

    @property
    def acts(self):
        """Last forward's hidden layers and logits as (batch, features) views."""
        a = self.arch
        return {"fc1": self._feature_major("act.fc1", a.h1),
                "fc2": self._feature_major("act.fc2", a.h2),
                "logits": self._feature_major("act.fc3", a.n_classes)}

    def forward_backward(self, pixels, labels):
        """Gradients of the batch-mean cross-entropy into ``grads``; returns that mean."""
        self._last_batch = len(labels)
        return self.net.step(pixels, labels, 0.0, 0) / len(labels)

    def train_step(self, pixels, labels, lr):
        """forward_backward with Adam fused into the backward pass."""
        self.adam_t += 1
        self._last_batch = len(labels)
        return self.net.step(pixels, labels, lr, self.adam_t) / len(labels)

    def predict(self, pixels):
        """(logits (n, 10), features (n, h2)) float32 of uint8 images (n, 784), in batches."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, self.arch.x_dim)
        n = len(pixels)
        logits = np.empty((n, self.arch.n_classes), dtype=np.float32)
        features = np.empty((n, self.arch.h2), dtype=np.float32)
        for start in range(0, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            self._last_batch = stop - start
            self.net.forward(pixels[start:stop], logits[start:stop], features[start:stop])
        if not (np.isfinite(logits).all() and np.isfinite(features).all()):
            # Finite weights can still overflow float32: no trained classifier's do.
            raise CvaeError(f"{self.source}: the classifier gives non-finite outputs (NaN or "
                            f"Inf): its weights are too large to be a trained classifier's")
        return logits, features

    def accuracy(self, dataset):
        logits, _ = self.predict(dataset.images)
        return float(np.mean(logits.argmax(axis=1) == dataset.labels))


# ---------------------------------------------------------------- training


def shifted(pixels, rng, max_shift=MAX_SHIFT):
    """Each image moved by its own whole-pixel offset in [-max_shift, max_shift]², zero fill:
    one gather from a zero-padded copy of the batch."""
    n = len(pixels)
    side, m = IMAGE_SIDE, max_shift
    padded = np.zeros((n, side + 2 * m, side + 2 * m), dtype=np.uint8)
    padded[:, m:m + side, m:m + side] = pixels.reshape(n, side, side)
    dy, dx = rng.integers(-m, m + 1, size=(2, n, 1, 1))
    rows = np.arange(side)[None, :, None] + m - dy
    cols = np.arange(side)[None, None, :] + m - dx
    return padded[np.arange(n)[:, None, None], rows, cols].reshape(n, side * side)


def cosine_lr(lr, step, total):
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / total))


def train_classifier(train_set, epochs=DEFAULT_EPOCHS, batch=DEFAULT_BATCH, lr=DEFAULT_LR,
                     seed=0, threads=1, arch=ClassifierArch(), on_epoch=None):
    """A classifier trained on train_set; on_epoch(epoch, mean loss) after each epoch."""
    model = DigitClassifier(arch, max_batch=max(batch, PREDICT_BATCH), threads=threads)
    model.init_params(seed)
    rng = np.random.default_rng(seed)
    images, labels = np.asarray(train_set.images), np.asarray(train_set.labels)
    n = len(labels)
    per_epoch = n // batch  # whole batches only: every step has the same size
    if per_epoch == 0:
        raise CvaeError(f"{train_set.name}: {n} images, fewer than one batch of {batch}")
    total = epochs * per_epoch
    step = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        loss_sum = 0.0
        for b in range(per_epoch):
            rows = np.sort(order[b * batch:(b + 1) * batch])
            x = shifted(np.take(images, rows, axis=0), rng)
            y = np.ascontiguousarray(np.take(labels, rows))
            loss_sum += model.train_step(x, y, cosine_lr(lr, step, total))
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, loss_sum / per_epoch)
    return model


# ---------------------------------------------------------------- files


def dataset_digest(dataset):
    """SHA-256 of a split's images and labels: which data a classifier was measured on."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(dataset.images).tobytes())
    h.update(np.ascontiguousarray(dataset.labels).tobytes())
    return h.hexdigest()


def save_classifier(path, model, meta):
    save_checkpoint(path, KIND, {"arch": model.arch.to_json(), **meta},
                    model.state_sections(optimizer=False))


def load_classifier(path, threads=1):
    """(classifier, meta) from a classifier file; a damaged or foreign file is a CvaeError."""
    if not os.path.isfile(path):
        raise CvaeError(f"classifier {path} does not exist")
    meta, sections, _ = load_checkpoint(path, expected_kind=KIND)
    model = DigitClassifier(ClassifierArch.from_json(meta["arch"], path), threads=threads)
    model.load_state_sections(sections, source=path)
    model.source = path
    return model, meta


def classifier_for(test_set, path=None, threads=1):
    """(classifier, meta, path) to judge samples against test_set: the given file, else the
    shipped MNIST classifier when test_set is the test set it was measured on; else
    (None, None, reason) saying how to get one."""
    if path is not None:
        model, meta = load_classifier(path, threads)
        return model, meta, path
    how = "train one with 'cvae classifier train --data DIR --out FILE' and pass --classifier FILE"
    if not os.path.isfile(SHIPPED):
        return None, None, (f"conditional accuracy and FID need a classifier, and the shipped "
                            f"one ({SHIPPED}) is missing from this install: reinstall cvae, or {how}")
    model, meta = load_classifier(SHIPPED, threads)
    if meta.get("test_digest") == dataset_digest(test_set):
        return model, meta, SHIPPED
    return None, None, ("conditional accuracy and FID need a classifier for this data (the "
                        f"shipped one is for the MNIST test set): {how}")


# ---------------------------------------------------------------- commands


def cmd_train(args):
    from cvae.cli import ensure_data
    from cvae.data import Dataset

    from cvae.atomic import check_writable

    out = os.path.abspath(check_writable(args.out))
    data_dir, _ = ensure_data(args)
    train_set = Dataset.load(data_dir, "train")
    test_set = Dataset.load(data_dir, "test")

    def on_epoch(epoch, loss):
        if not args.quiet:
            print(json.dumps({"epoch": epoch, "train_loss": loss}) if args.json
                  else f"epoch {epoch}/{args.epochs}: train cross-entropy {loss:.4f}", flush=True)

    start = time.perf_counter()
    model = train_classifier(train_set, epochs=args.epochs, batch=args.batch, lr=args.lr,
                             seed=args.seed, threads=args.threads, on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    accuracy = model.accuracy(test_set)
    meta = {"seed": args.seed, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
            "max_shift": MAX_SHIFT, "kernels": model.kernel_isa, "train_images": len(train_set),
            "test_images": len(test_set), "test_accuracy": accuracy,
            "test_digest": dataset_digest(test_set)}
    save_classifier(out, model, meta)
    result = {"classifier": out, "test_accuracy": accuracy, "seconds": seconds,
              "threads": args.threads}
    print(json.dumps(result) if args.json else
          f"test accuracy {100 * accuracy:.2f}% on {len(test_set):,} test images "
          f"({seconds:.0f} s on {args.threads} threads) -> {out}", flush=True)
    return 0


def cmd_eval(args):
    from cvae.data import Dataset
    from cvae.fetch import resolve_data_dir

    path = args.classifier or SHIPPED
    model, meta = load_classifier(path, args.threads)
    data_dir, _ = resolve_data_dir(args.data)
    test_set = Dataset.load(data_dir, "test")
    logits, _ = model.predict(test_set.images)
    correct = logits.argmax(axis=1) == test_set.labels
    per_digit = {int(d): float(correct[test_set.labels == d].mean())
                 for d in range(NUM_DIGITS) if np.any(test_set.labels == d)}
    result = {"classifier": os.path.abspath(path), "test_accuracy": float(correct.mean()),
              "test_accuracy_per_digit": per_digit, "test_images": len(test_set)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{path}: test accuracy {100 * result['test_accuracy']:.2f}% on "
              f"{len(test_set):,} images; per digit "
              + ", ".join(f"{d}: {100 * v:.1f}%" for d, v in per_digit.items()))
    return 0


def register(subparsers):
    from cvae.cli import Formatter, Parser, positive_float, positive_int, non_negative_int
    from cvae.kernels import default_threads

    p = subparsers.add_parser(
        "classifier", formatter_class=Formatter,
        help="train or check the digit classifier that judges generated digits",
        description="The MLP digit classifier (784-512-256-10, trained with cvae's kernels) "
                    "behind `cvae eval`'s conditional accuracy and FID. The one for MNIST "
                    "ships with cvae; train another for other data.")
    sub = p.add_subparsers(dest="classifier_command", metavar="ACTION", parser_class=Parser)
    sub.required = True
    q = sub.add_parser("train", formatter_class=Formatter, help="train a classifier",
                       description="Train on the data's train split (random ±2-pixel shifts, "
                                   "cosine learning rate), report the test accuracy, save.")
    q.add_argument("--out", required=True, metavar="FILE", help="classifier file to write")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="IDX directory (default: $CVAE_DATA, else the MNIST cache)")
    q.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="epochs")
    q.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH, help="minibatch size")
    q.add_argument("--lr", type=positive_float, default=DEFAULT_LR, help="peak learning rate")
    q.add_argument("--seed", type=non_negative_int, default=0, help="seed")
    q.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="OpenMP threads")
    group = q.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="one JSON object per line")
    group.add_argument("--quiet", action="store_true", help="print only the result")
    q.set_defaults(func=cmd_train)
    q = sub.add_parser("eval", formatter_class=Formatter, help="a classifier's test accuracy",
                       description="Accuracy (overall and per digit) on the data's test split.")
    q.add_argument("--classifier", metavar="FILE", default=None,
                   help="classifier file (default: the shipped MNIST classifier)")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="IDX directory (default: $CVAE_DATA, else the MNIST cache)")
    q.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="OpenMP threads")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_eval)
