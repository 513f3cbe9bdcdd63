"""What the test modules share: tiny IDX files written by hand from the format (not with cvae's
own writer), the real-data switch, and running `cvae` in this process or as a subprocess.

tests/ is a package (tests/__init__.py), so the modules import the plain helpers below with
`from .conftest import ...` and pytest finds the fixtures itself: no sys.path edits."""

import gzip
import os
import struct

import numpy as np
import pytest

from cvae import cli, kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- real MNIST

# Read at import, before the no_real_data fixture hides it from the tests that use it.
REAL = os.environ.get("CVAE_DATA")
needs_real_data = pytest.mark.skipif(not REAL, reason="CVAE_DATA not set (real MNIST)")


@pytest.fixture
def real_data():
    """The directory of the real MNIST files ($CVAE_DATA); the test is skipped without it."""
    if not REAL or not os.path.isdir(REAL):
        pytest.skip("set CVAE_DATA to a directory holding the MNIST files")
    return REAL


@pytest.fixture
def no_real_data(monkeypatch, tmp_path):
    """Used by a test module (pytestmark = pytest.mark.usefixtures("no_real_data")): none of its
    tests touches the user's cache or the real data unless it sets CVAE_DATA itself."""
    monkeypatch.delenv("CVAE_DATA", raising=False)
    monkeypatch.setenv("CVAE_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- tiny IDX files


def image_idx(images):
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)
    return b"\x00\x00\x08\x03" + struct.pack(">III", *images.shape) + images.tobytes()


def label_idx(labels):
    labels = np.asarray(labels, dtype=np.uint8)
    return b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + labels.tobytes()


def write_split(directory, prefix, images, labels, gz=False):
    """The two files of one split ("train" or "t10k") under their MNIST names, raw or .gz;
    returns directory."""
    suffix = ".gz" if gz else ""
    for name, data in ((f"{prefix}-images-idx3-ubyte", image_idx(images)),
                       (f"{prefix}-labels-idx1-ubyte", label_idx(labels))):
        (directory / (name + suffix)).write_bytes(gzip.compress(data) if gz else data)
    return directory


def make_digits(n, seed):
    """Digit-like images: a per-class template (a bright bar at a class-specific place) plus noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = np.zeros((n, 28, 28), dtype=np.float64)
    for k, d in enumerate(labels):
        r = 3 + 2 * int(d)
        images[k, r:r + 3, 4:24] = 1.0
        images[k, 4:24, r:r + 2] = 0.7
    images += rng.normal(0, 0.15, images.shape)
    images = np.clip(images * 255, 0, 255).astype(np.uint8).reshape(n, 784)
    return images, labels


def write_mnist_dir(directory, n_train=200, n_test=60, seed=0):
    """A tiny MNIST directory (raw IDX files) of make_digits images, all ten digits."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        write_split(directory, prefix, *make_digits(n, s))
    return directory


@pytest.fixture
def data_dir(tmp_path):
    return write_mnist_dir(tmp_path / "mnist")


def checkpoint_world(root, model, digits, images, labels):
    """A run directory holding `model` as last.cvae (trained on `digits`) and a test split."""
    from cvae.checkpoint import save_checkpoint

    run = root / "run"
    run.mkdir()
    meta = {"arch": model.arch.to_json(), "digits": list(digits), "adam_t": 0}
    save_checkpoint(run / "last.cvae", "cvae", meta, model.state_sections())
    data = root / "data"
    data.mkdir()
    write_split(data, "t10k", images, labels)
    return {"root": root, "run": run, "ckpt": run / "last.cvae", "data": data, "meta": meta,
            "model": model, "images": images, "labels": labels}


# ---------------------------------------------------------------- models and files


def assert_training_allocates_nothing(model, pixels, labels, warmup=5, steps=50):
    """train_step `warmup` times, then `steps` times under tracemalloc: the traced peak may
    not rise by 16 KiB (everything a step needs lives in the slab) and the slab stays put."""
    import tracemalloc

    for step in range(warmup):
        model.train_step(pixels, labels, 1e-3, 1.0, 0, step)
    address = model.slab.ctypes.data
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for step in range(warmup, warmup + steps):
            model.train_step(pixels, labels, 1e-3, 1.0, 0, step)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before < 16384, f"peak traced memory rose {peak - before} bytes in the loop"
    assert model.slab.ctypes.data == address


def params64(model):
    """A kernel model's (CVAE, classifier or flow prior) parameters as float64 copies."""
    return {k: np.array(v, dtype=np.float64) for k, v in model.params.items()}


def tree(directory, skip=()):
    """{relative path: bytes} of every file under directory (not under subdirectories named
    in skip)."""
    found = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def leftover_temp_files(directory):
    """The .tmp files an interrupted atomic write would leave behind."""
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


# ---------------------------------------------------------------- running cvae


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `cvae argv...` run in this process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env():
    """The environment for `python -m cvae` in a subprocess: this source tree importable, no
    real data."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CVAE_DATA", None)
    return env


def assert_one_line_error(code, err, *fragments):
    """A usage or data error as the CLI must give it: exit 2, one `cvae: error:` line on
    stderr holding every fragment, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cvae: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- kernel builds


def runnable_builds():
    """The kernel builds installed that this CPU can run (the baseline always)."""
    base = kernels._import("baseline")
    return [b for b in kernels.BUILDS
            if kernels._import(b) is not None and (b == "baseline" or kernels._runs_here(b, base))]


@pytest.fixture
def forced_build(monkeypatch):
    """force(build): load that kernel build (CVAE_KERNELS) for the rest of the test."""
    def force(build):
        monkeypatch.setenv("CVAE_KERNELS", build)
        monkeypatch.setattr(kernels, "_loaded", None)
    yield force
    kernels._loaded = None
