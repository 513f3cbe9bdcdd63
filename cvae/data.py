"""MNIST in IDX format: validated readers, the per-split dataset and the minibatch stream.

Pixels stay uint8 from disk to the batch buffers; the kernels turn them into floats
(pixels_forward in _kernels.pyx), into the slab.
"""

import gzip
import json
import math
import os
import re
import zlib

import numpy as np

from cvae.atomic import atomic_open, json_default, write_text_atomic
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


# ---------------------------------------------------------------- writing IDX files


GENERATED_SUFFIX = "generated.json"  # DIR/train-generated.json: what made a generated set
PARTS_DIR = "parts"  # DIR/parts/: the shards' rows of a generated set, until merged
_PART_NAME = re.compile(r"^(train|t10k)-(\d+)-of-(\d+)-generated\.json$")


def idx_image_header(count):
    return bytes([0, 0, _IDX_UBYTE_TYPE, 3]) + b"".join(
        v.to_bytes(4, "big") for v in (count, IMAGE_SIDE, IMAGE_SIDE))


def idx_label_header(count):
    return bytes([0, 0, _IDX_UBYTE_TYPE, 1]) + count.to_bytes(4, "big")


def write_idx_pair(images_path, labels_path, count, blocks):
    """Write an IDX3 image file and its IDX1 label file of `count` rows from an iterable of
    (images (k, 784) uint8, labels (k,) uint8) blocks, streamed (memory: one block), both
    atomically: nothing is renamed into place unless every block arrived and they add up to
    count. A part of a count that does not fit the format's 32-bit sizes is refused first."""
    if not 0 <= count < 2 ** 32:
        raise CvaeError(f"{images_path}: {count} images do not fit an IDX file's 32-bit count")
    written = 0
    try:
        with atomic_open(images_path, "wb") as images_file, \
                atomic_open(labels_path, "wb") as labels_file:
            images_file.write(idx_image_header(count))
            labels_file.write(idx_label_header(count))
            for images, labels in blocks:
                images = np.ascontiguousarray(images, dtype=np.uint8)
                labels = np.ascontiguousarray(labels, dtype=np.uint8)
                if images.shape != (len(labels), PIXELS_PER_IMAGE) or labels.ndim != 1:
                    raise ValueError(f"a block of {images.shape} images and {labels.shape} labels")
                if len(labels) and int(labels.max()) >= NUM_DIGITS:
                    raise ValueError("labels must be digits 0-9")
                written += len(labels)
                if written > count:
                    raise ValueError(f"more than the {count} rows announced")
                images_file.write(images.data)
                labels_file.write(labels.data)
            if written != count:
                raise ValueError(f"{written} rows written, {count} announced")
    except OSError as e:
        raise CvaeError(f"cannot write {images_path}: {e.strerror or e}") from None
    return [os.fspath(images_path), os.fspath(labels_path)]


def idx_set_names(split):
    """(images, labels, description) file names of a generated split."""
    prefix = _check_split(split)
    return (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte",
            f"{prefix}-{GENERATED_SUFFIX}")


def part_names(split, k, n):
    """(images, labels, description) file names of part k of n of a generated split."""
    prefix = _check_split(split)
    stem = f"{prefix}-{k:04d}-of-{n:04d}"
    return (f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte",
            f"{stem}-{GENERATED_SUFFIX}")


def _json_text(document):
    return json.dumps(document, indent=2, sort_keys=True, default=json_default,
                      allow_nan=False) + "\n"


def write_generated_idx(directory, split, blocks, rows, total, description, shard=None):
    """A generated data set in `directory`, from the (images, labels) blocks of `rows`
    (start, stop) of its `total` rows:

    - unsharded (rows = (0, total)): the pair any MNIST loader reads, DIR/train-images-idx3-ubyte
      and DIR/train-labels-idx1-ubyte (t10k-... for split "test"), and
      DIR/train-generated.json: `description` (what made them) plus the file names and count;
    - shard k of n: the part DIR/parts/train-KKKK-of-NNNN-images-idx3-ubyte, -labels-idx1-ubyte
      (an IDX pair of its rows) and -generated.json (the same description, plus "part": k, n,
      rows, total), written last: a part with its JSON is complete. merge_idx_parts joins them.

    Returns the paths written."""
    directory = os.fspath(directory)
    start, stop = rows
    document = _set_document(split, total, description)
    if shard is None:
        names = idx_set_names(split)
        where = directory
    else:
        names = part_names(split, shard.k, shard.n)
        where = os.path.join(directory, PARTS_DIR)
        document = {**document, "part": {"k": shard.k, "n": shard.n, "rows": [start, stop],
                                         "total": total}}
    os.makedirs(where, exist_ok=True)
    paths = write_idx_pair(os.path.join(where, names[0]), os.path.join(where, names[1]),
                           stop - start, blocks)
    json_path = os.path.join(where, names[2])
    write_text_atomic(json_path, _json_text(document))
    return paths + [json_path]


def _set_document(split, total, description):
    images, labels, _ = idx_set_names(split)
    return {**description, "format": "idx", "split": split, "images": images,
            "labels": labels, "count": total}


def merge_idx_parts(directory, split="train"):
    """Join the parts of a sharded generation (DIR/parts, see write_generated_idx) into the
    pair and JSON an unsharded run writes, byte for byte, streamed part by part. Every part
    1 .. n must be there, complete, of the same generation (the same description) and their
    rows must follow each other; otherwise a CvaeError naming what is wrong (the missing
    parts by file name). The parts are left in place. Returns (paths written, rows, parts)."""
    directory = os.fspath(directory)
    prefix = _check_split(split)
    parts_dir = os.path.join(directory, PARTS_DIR)
    if not os.path.isdir(parts_dir):
        raise CvaeError(f"{directory} has no {PARTS_DIR}/ directory: nothing to merge (run "
                        f"'cvae generate --format idx --shard K/N --out {directory}' first)")
    found = {}
    for name in sorted(os.listdir(parts_dir)):
        match = _PART_NAME.match(name)
        if match and match.group(1) == prefix:
            found.setdefault(int(match.group(3)), {})[int(match.group(2))] = name
    if not found:
        raise CvaeError(f"{parts_dir} holds no parts of the {split} split "
                        f"({prefix}-KKKK-of-NNNN-{GENERATED_SUFFIX})")
    if len(found) > 1:
        raise CvaeError(f"{parts_dir} holds parts of {len(found)} different splittings "
                        f"(N = {', '.join(map(str, sorted(found)))}): remove the stale ones")
    (n, by_k), = found.items()
    missing = [k for k in range(1, n + 1) if k not in by_k]
    if missing:
        shown = ", ".join(part_names(split, k, n)[2] for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CvaeError(f"{parts_dir}: {len(missing)} of {n} parts missing or unfinished "
                        f"(part{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(str, missing[:20]))}: {shown}{more})")
    documents = []
    for k in range(1, n + 1):
        path = os.path.join(parts_dir, by_k[k])
        try:
            with open(path) as f:
                documents.append(json.load(f))
        except (OSError, ValueError) as e:
            raise CvaeError(f"{path}: not a readable part description ({e})") from None
    base = {key: value for key, value in documents[0].items() if key != "part"}
    total = base.get("count")
    position = 0
    for k, document in enumerate(documents, 1):
        part = document.get("part") or {}
        if {key: v for key, v in document.items() if key != "part"} != base:
            raise CvaeError(f"{by_k[k]} comes from another generation than {by_k[1]} (their "
                            f"settings differ): remove the stale parts and generate again")
        if part.get("k") != k or part.get("n") != n or part.get("rows", [None])[0] != position:
            raise CvaeError(f"{by_k[k]}: its rows {part.get('rows')} do not follow the parts "
                            f"before it (rows 0-{position})")
        position = part["rows"][1]
    if position != total:
        raise CvaeError(f"the parts in {parts_dir} hold {position} rows, their generation "
                        f"{total}")

    def blocks():
        for k in range(1, n + 1):
            names = [os.path.join(parts_dir, name) for name in part_names(split, k, n)[:2]]
            count = len(read_idx_images(names[0]))  # the headers and sizes checked
            rows = documents[k - 1]["part"]["rows"]
            if len(read_idx_labels(names[1])) != count or count != rows[1] - rows[0]:
                raise CvaeError(f"{names[0]}: its images and labels do not hold the "
                                f"{rows[1] - rows[0]} rows its description says")
            # plain reads, block by block (not the reader's memory map, whose pages would
            # count as the process's memory for a whole part)
            with open(names[0], "rb") as images, open(names[1], "rb") as labels:
                images.seek(len(idx_image_header(0)))
                labels.seek(len(idx_label_header(0)))
                for start in range(0, count, 65536):
                    rows_now = min(65536, count - start)
                    pixels = np.frombuffer(images.read(rows_now * PIXELS_PER_IMAGE), np.uint8)
                    yield (pixels.reshape(rows_now, PIXELS_PER_IMAGE),
                           np.frombuffer(labels.read(rows_now), np.uint8))

    names = idx_set_names(split)
    paths = write_idx_pair(os.path.join(directory, names[0]), os.path.join(directory, names[1]),
                           total, blocks())
    json_path = os.path.join(directory, names[2])
    write_text_atomic(json_path, _json_text(base))
    return paths + [json_path], total, n
