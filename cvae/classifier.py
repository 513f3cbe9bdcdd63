"""The project's own digit classifier: the judge of conditional accuracy and the feature
space of the FID (`cvae eval`).

An MLP, pixels/255 -> 512 -> 256 -> 10 class logits (ReLU), run by the same kernels as the
CVAE (cvae._kernels.Classifier) over its own slab; cvae.train_classifier trains it with softmax
cross-entropy and Adam.

The classifier for MNIST ships in the package (assets/mnist-classifier.cvae, parameters
only, about 2 MB), made by the command in the README. Its header records a digest of the
test set it was measured on; `cvae eval` uses it by default only on that test set.
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from cvae.checkpoint import header_int, load_checkpoint, register_kind_check, save_checkpoint
from cvae.data import NUM_DIGITS, PIXELS_PER_IMAGE
from cvae.errors import CvaeError
from cvae.model import ACTIVATIONS, MAX_WIDTH, SlabModel, check_sizes, check_state_sections

KIND = "classifier"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                       "mnist-classifier.cvae")
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


register_kind_check(KIND, check_checkpoint)


class DigitClassifier(SlabModel):
    """The classifier's slab and the kernels' Classifier over it."""

    def __init__(self, arch=ClassifierArch(), max_batch=PREDICT_BATCH, threads=1,
                 precision="fp32"):
        if arch.act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.arch = arch
        self.source = "the classifier"  # its file once loaded, for error messages
        rows = {"x": arch.x_dim, "fc1": arch.h1, "fc2": arch.h2, "fc3": arch.n_classes}
        k = self._carve(arch.layers(), rows, ("fc1", "fc2", "fc3"), ("loss",), max_batch,
                        threads, precision)
        self.net = k.Classifier(self.slab, self.layout, arch.layers(), self.max_bp, arch.act,
                                threads, precision)

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
