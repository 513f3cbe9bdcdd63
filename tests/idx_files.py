"""IDX bytes for tests, written by hand from the format (not with cvae's own writer)."""

import struct

import numpy as np


def image_idx(images):
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)
    return b"\x00\x00\x08\x03" + struct.pack(">III", *images.shape) + images.tobytes()


def label_idx(labels):
    labels = np.asarray(labels, dtype=np.uint8)
    return b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + labels.tobytes()
