"""IDX bytes for tests, written by hand from the format (not with cvae's own writer)."""

import struct

import numpy as np


def image_idx(images):
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)
    return b"\x00\x00\x08\x03" + struct.pack(">III", *images.shape) + images.tobytes()


def label_idx(labels):
    labels = np.asarray(labels, dtype=np.uint8)
    return b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + labels.tobytes()


def checkpoint_world(root, model, digits, images, labels):
    """A run directory holding `model` as last.cvae (trained on `digits`) and a test split."""
    from cvae.checkpoint import save_checkpoint

    run = root / "run"
    run.mkdir()
    meta = {"arch": model.arch.to_json(), "digits": list(digits), "adam_t": 0}
    save_checkpoint(run / "last.cvae", "cvae", meta, model.state_sections())
    data = root / "data"
    data.mkdir()
    (data / "t10k-images-idx3-ubyte").write_bytes(image_idx(images))
    (data / "t10k-labels-idx1-ubyte").write_bytes(label_idx(labels))
    return {"root": root, "run": run, "ckpt": run / "last.cvae", "data": data, "meta": meta,
            "model": model, "images": images, "labels": labels}
