"""MNIST in IDX format: validated readers, the per-split dataset and the minibatch stream.

Pixels stay uint8 from disk to the batch buffers; the kernels turn them into floats
(pixels_forward in _kernels.pyx), into the slab.
"""

import gzip
import math
import os
import re
import zlib

import numpy as np

from cvae.errors import CvaeError

IMAGE_SIDE = 28
PIXELS_PER_IMAGE = IMAGE_SIDE * IMAGE_SIDE
NUM_DIGITS = 10

_IDX_UBYTE_TYPE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_HEADER_BYTES = 4 + 4 * 3  # magic, then up to three big-endian uint32 sizes

SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


# ---------------------------------------------------------------- IDX readers


def _read_source(path):
    """Return (display_name, header_bytes, data_length, loader) for a raw or gzipped file.

    loader(offset, count) gives the uint8 array of count items starting at offset.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            start = f.read(2)
    except FileNotFoundError:
        raise CvaeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CvaeError(f"{path}: is a directory, expected an IDX file") from None
    except OSError as e:
        raise CvaeError(f"{path}: cannot read: {e.strerror or e}") from None

    looks_gzipped = start == _GZIP_MAGIC
    if path.endswith(".gz") and not looks_gzipped:
        raise CvaeError(f"{path}: not a gzip file, although its name ends in .gz")
    if looks_gzipped:
        # A gzip stream cannot be memory-mapped; decompressing once into one bytes
        # object lets np.frombuffer hand out views without further copies.
        try:
            with gzip.open(path, "rb") as f:
                content = f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise CvaeError(f"{path}: corrupt gzip data ({e})") from None

        def load(offset, count):
            return np.frombuffer(content, dtype=np.uint8, count=count, offset=offset)

        return path, content[:_MAX_HEADER_BYTES], len(content), load

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(_MAX_HEADER_BYTES)
    except OSError as e:
        raise CvaeError(f"{path}: cannot read: {e.strerror or e}") from None

    def load(offset, count):
        if count == 0:
            # mmap refuses zero-length mappings.
            empty = np.empty(0, dtype=np.uint8)
            empty.flags.writeable = False
            return empty
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(count,))

    return path, header, size, load


def _parse_idx(path, expected_dims, what):
    """Validate an IDX ubyte file's header; return (name, dims, loader, data_offset, data_length)."""
    name, header, length, load = _read_source(path)
    if length < 4:
        raise CvaeError(f"{name}: too short to be an IDX file ({length} bytes)")
    if header[0] != 0 or header[1] != 0:
        raise CvaeError(
            f"{name}: not an IDX file (magic starts with {header[0]:02x} {header[1]:02x}, expected 00 00)"
        )
    type_code, ndims = header[2], header[3]
    if type_code != _IDX_UBYTE_TYPE:
        raise CvaeError(f"{name}: IDX type code 0x{type_code:02x} is not supported (expected 0x08, unsigned byte)")
    if ndims != expected_dims:
        raise CvaeError(f"{name}: has {ndims} dimensions, but {what} files have {expected_dims}")
    header_length = 4 + 4 * ndims
    if length < header_length:
        raise CvaeError(f"{name}: truncated inside the IDX header ({length} of {header_length} bytes)")
    dims = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndims))
    return name, dims, load, header_length, length - header_length


def _describe_size_mismatch(name, shape_text, expected, actual):
    if actual < expected:
        return f"{name}: truncated: header says {shape_text} ({expected} bytes) but the file has {actual} bytes of data"
    return f"{name}: {actual - expected} unexpected extra bytes after the {shape_text} the header describes"


def read_idx_images(path):
    """Read an IDX3 ubyte image file (raw or .gz) as a read-only uint8 array (n, 784)."""
    name, (count, rows, cols), load, offset, data_length = _parse_idx(path, 3, "image")
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
        raise CvaeError(f"{name}: images are {rows}x{cols} pixels, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    expected = count * rows * cols
    if data_length != expected:
        raise CvaeError(_describe_size_mismatch(name, f"{count}x{rows}x{cols} images", expected, data_length))
    return load(offset, expected).reshape(count, PIXELS_PER_IMAGE)


def read_idx_labels(path):
    """Read an IDX1 ubyte label file (raw or .gz) as a read-only uint8 array (n,) of digits 0-9."""
    name, (count,), load, offset, data_length = _parse_idx(path, 1, "label")
    if data_length != count:
        raise CvaeError(_describe_size_mismatch(name, f"{count} labels", count, data_length))
    labels = load(offset, count)
    if count:
        bad = np.flatnonzero(labels >= NUM_DIGITS)
        if bad.size:
            first = int(bad[0])
            raise CvaeError(
                f"{name}: {bad.size} labels outside 0-9 (the first is {int(labels[first])} at index {first})"
            )
    return labels


# ---------------------------------------------------------------- locating files


def _check_split(split):
    if split not in SPLIT_PREFIXES:
        raise CvaeError(f"unknown data split {split!r}: expected 'train' or 'test'")
    return SPLIT_PREFIXES[split]


def candidate_names(split, kind):
    """File names accepted for split ('train'/'test') and kind ('images'/'labels'), preferred first.

    Raw files come first because they are memory-mapped instead of decompressed.
    """
    prefix = _check_split(split)
    idx = "idx3" if kind == "images" else "idx1"
    stems = [f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"]
    return stems + [stem + ".gz" for stem in stems]


def locate_mnist_file(data_dir, split, kind):
    """Path of the first accepted file for (split, kind) in data_dir, or None."""
    for name in candidate_names(split, kind):
        path = os.path.join(os.fspath(data_dir), name)
        if os.path.isfile(path):
            return path
    return None


def has_mnist_files(data_dir, splits=("train", "test")):
    """Whether data_dir holds the images and labels of every split (raw or .gz)."""
    return os.path.isdir(data_dir) and all(
        locate_mnist_file(data_dir, split, kind) is not None
        for split in splits for kind in ("images", "labels"))


def find_mnist_files(data_dir, split):
    """Return (images_path, labels_path) for split in data_dir, raw or gzipped."""
    data_dir = os.fspath(data_dir)
    _check_split(split)
    if not os.path.isdir(data_dir):
        raise CvaeError(f"MNIST data directory {data_dir} does not exist")
    found = {}
    missing = []
    for kind in ("images", "labels"):
        found[kind] = locate_mnist_file(data_dir, split, kind)
        if found[kind] is None:
            missing.extend(candidate_names(split, kind))
    if missing:
        raise CvaeError(f"MNIST {split} data not found in {data_dir}: looked for {', '.join(missing)}")
    return found["images"], found["labels"]


# ---------------------------------------------------------------- digit selection


_DIGIT_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_digits(text):
    """'0,1' / '0-9' / '3' / '0-4,7' -> sorted tuple of distinct digits."""
    if not isinstance(text, str) or not text.strip():
        raise CvaeError(f"digit selection {text!r} is empty: give digits like '0-9', '3' or '0-4,7'")
    digits = set()
    for item in text.split(","):
        match = _DIGIT_ITEM.match(item)
        if not match:
            raise CvaeError(f"bad digit selection {text!r}: {item.strip()!r} is not a digit or a range like 0-4")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        for value in (low, high):
            if value >= NUM_DIGITS:
                raise CvaeError(f"bad digit selection {text!r}: {value} is not a digit 0-9")
        if high < low:
            raise CvaeError(f"bad digit selection {text!r}: range {low}-{high} runs backwards")
        digits.update(range(low, high + 1))
    return tuple(sorted(digits))


def digits_text(digits):
    """The inverse of parse_digits, compact: (0, 1, 2, 3, 5) -> '0-3,5'."""
    digits = sorted(set(int(d) for d in digits))
    parts = []
    start = prev = None
    for d in digits + [None]:
        if start is not None and (d is None or d != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if d is not None and start is None:
            start = d
        prev = d
    return ",".join(parts)


def _normalise_digits(digits):
    if isinstance(digits, str):
        return parse_digits(digits)
    try:
        values = {int(d) for d in digits}
    except (TypeError, ValueError):
        raise CvaeError(f"bad digit selection {digits!r}: expected digits 0-9") from None
    if not values:
        raise CvaeError("digit selection is empty")
    out_of_range = sorted(v for v in values if not 0 <= v < NUM_DIGITS)
    if out_of_range:
        raise CvaeError(f"bad digit selection: {out_of_range[0]} is not a digit 0-9")
    return tuple(sorted(values))


# ---------------------------------------------------------------- dataset


class Dataset:
    """Images (n, 784) uint8 and labels (n,) uint8 of one split, optionally limited to some digits.

    With every row selected the arrays are the (memory-mapped or decompressed) file data
    itself; a digit subset is one uint8 gather of the selected rows.
    """

    def __init__(self, images, labels, name="dataset"):
        if images.ndim != 2 or images.shape[1] != PIXELS_PER_IMAGE or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (n, {PIXELS_PER_IMAGE}), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],) or labels.dtype != np.uint8:
            raise ValueError(f"labels must be uint8 ({images.shape[0]},), got {labels.dtype} {labels.shape}")
        self.images = images
        self.labels = labels
        self.name = name
        self._digits = None

    @classmethod
    def load(cls, data_dir, split, digits=None):
        images_path, labels_path = find_mnist_files(data_dir, split)
        images = read_idx_images(images_path)
        labels = read_idx_labels(labels_path)
        if len(images) != len(labels):
            raise CvaeError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        name = f"MNIST {split} ({os.fspath(data_dir)})"
        if len(images) == 0:
            raise CvaeError(f"{images_path}: contains no images")
        if digits is None:
            return cls(images, labels, name)

        wanted = _normalise_digits(digits)
        counts = np.bincount(labels, minlength=NUM_DIGITS)
        absent = [d for d in wanted if counts[d] == 0]
        if absent:
            raise CvaeError(f"{name} has no images of digit {', '.join(map(str, absent))}")
        return cls(images, labels, name).restrict(wanted)

    def rows_of(self, digits):
        """Indices, in file order, of the images whose label is one of digits."""
        keep = np.zeros(NUM_DIGITS, dtype=bool)
        keep[list(digits)] = True
        return np.flatnonzero(keep[np.asarray(self.labels)])

    def restrict(self, digits):
        """The images of these digits, in file order (image indices, hence noise keys, match
        a Dataset.load(..., digits)); this dataset itself when nothing is left out."""
        rows = self.rows_of(digits)
        if len(rows) == len(self.labels):
            return self
        return Dataset(np.take(self.images, rows, axis=0), np.take(self.labels, rows), self.name)

    def __len__(self):
        return len(self.labels)

    @property
    def digits(self):
        """Sorted tuple of the digits present in this dataset."""
        if self._digits is None:
            counts = np.bincount(self.labels, minlength=NUM_DIGITS)
            self._digits = tuple(int(d) for d in np.flatnonzero(counts))
        return self._digits

    def __repr__(self):
        return f"<Dataset {self.name}: {len(self)} images of digits {self.digits}>"


# ---------------------------------------------------------------- batches


class BatchStream:
    """Shuffled uint8 minibatches, reproducible per (seed, epoch), gathered into two reused buffers.

    Each yielded (pixels, labels) pair is only valid until the next one is requested:
    the same buffers are overwritten, so keep a copy if a batch must outlive the step.
    """

    def __init__(self, dataset, batch_size, seed):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise CvaeError(f"batch size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise CvaeError(f"seed must be a non-negative integer, got {seed!r}")
        if len(dataset) == 0:
            raise CvaeError(f"{getattr(dataset, 'name', 'dataset')} is empty: nothing to train on")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        rows = min(self.batch_size, len(dataset))
        self._pixels = np.empty((rows, PIXELS_PER_IMAGE), dtype=np.uint8)
        self._labels = np.empty((rows,), dtype=np.uint8)

    @property
    def batches_per_epoch(self):
        return math.ceil(len(self.dataset) / self.batch_size)

    def order(self, epoch_index):
        """The row permutation of one epoch."""
        return np.random.default_rng([self.seed, int(epoch_index)]).permutation(len(self.dataset))

    def epoch(self, epoch_index, start_batch=0):
        """Yield (pixels (k, 784) uint8, labels (k,) uint8) for one epoch, from batch start_batch on.

        The last batch may be partial (k < batch_size); it is a view of the buffers' first k rows.
        """
        if isinstance(epoch_index, bool) or not isinstance(epoch_index, (int, np.integer)) or epoch_index < 0:
            raise CvaeError(f"epoch index must be a non-negative integer, got {epoch_index!r}")
        if (
            isinstance(start_batch, bool)
            or not isinstance(start_batch, (int, np.integer))
            or not 0 <= start_batch <= self.batches_per_epoch
        ):
            raise CvaeError(
                f"cannot resume at batch {start_batch}: an epoch has {self.batches_per_epoch} batches"
            )
        # Validation happens here, not inside the generator, so bad arguments fail at the call.
        return self._batches(self.order(epoch_index), int(start_batch))

    def _batches(self, order, start_batch):
        images, labels = self.dataset.images, self.dataset.labels
        size = self.batch_size
        for start in range(start_batch * size, len(order), size):
            rows = order[start:start + size]
            k = len(rows)
            pixels_out = self._pixels if k == len(self._pixels) else self._pixels[:k]
            labels_out = self._labels if k == len(self._labels) else self._labels[:k]
            # mode="clip" skips the bounds-checked path that would buffer `out`; the
            # permutation's indices are in range by construction.
            np.take(images, rows, axis=0, out=pixels_out, mode="clip")
            np.take(labels, rows, out=labels_out, mode="clip")
            yield pixels_out, labels_out
