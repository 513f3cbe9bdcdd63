"""What the peers (torch_cvae.py, jax_cvae.py, torch_generate.py) share: the variants and the
MNIST reader, in NumPy only, so that each peer imports just its own framework and none of them
imports cvae (they run in the benchmark venv, where cvae is not installed).
"""
import gzip
import os

import numpy as np

# name -> (h1, h2, latent, digits); the same table as cvae.model.VARIANTS
VARIANTS = {"mini": (256, 128, 32, (0, 1)), "mid": (512, 256, 64, (0, 1)), "full": (640, 320, 128, tuple(range(10)))}
# The convolutional CVAE of issue 17, name -> ((C1, C2), hidden, latent, digits); the defaults of
# cvae's `--variant conv`, which `--channels`, `--hidden` and `--latent` override.
CONV_VARIANTS = {"conv": ((32, 64), 512, 128, tuple(range(10)))}


def digits_of(variant):
    """The digits a variant (MLP or conv) trains on."""
    return (VARIANTS.get(variant) or CONV_VARIANTS[variant])[3]


def conv_param_count(channels, hidden, latent, classes=10):
    """The parameters the issue's conv architecture has, counted from its text, layer by layer
    (weights + biases), independent of any framework: what a peer's model must have."""
    c1, c2 = channels
    flat = c2 * 7 * 7
    return ((16 * 1 * c1 + c1) + (16 * c1 * c2 + c2)                      # conv 1->C1, conv C1->C2
            + ((flat + classes) * hidden + hidden) + (hidden * 2 * latent + 2 * latent)  # fc H, fc 2L
            + ((latent + classes) * hidden + hidden) + (hidden * flat + flat)            # fc H, fc C2*49
            + (16 * c2 * c1 + c1) + (16 * c1 * 1 + 1))                     # tconv C2->C1, tconv C1->1
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """IDX file (gzip) -> uint8 numpy array. Header: 0, 0, dtype (0x08 = ubyte), ndim, then ndim big-endian u32."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    return np.frombuffer(raw, np.uint8, int(np.prod(shape)), 4 + 4 * ndim).reshape(shape)


def load_mnist_np(split, digits, data_dir=None):
    """-> x float32 (n, 784) = bytes/255 (not binarised), y int64 (n,), only the given digits."""
    data_dir = data_dir or os.environ.get("CVAE_DATA", "/work/shared/data/mnist")
    images, labels = (read_idx(os.path.join(data_dir, f)) for f in FILES[split])
    keep = np.isin(labels, digits)
    return images[keep].reshape(-1, 784).astype(np.float32) / 255.0, labels[keep].astype(np.int64)


def thread_counts(text):
    """'1,2' -> [1, 2]."""
    return [int(s) for s in text.split(",") if s.strip()]
