"""cvae's own checkpoint format: JSON header plus raw float32 arrays, no pickle, nothing executed.

Layout (all integers little-endian):

    8 bytes   magic b"CVAECKPT"
    uint32    format version (1)
    uint64    header length in bytes
    header    UTF-8 JSON, keys sorted: {"cvae_version", "dtype": "float32", "kind", "meta",
              "sections": [{"name", "shape", "offset", "nbytes"}, ...]}
    zeros     up to the next 64-byte boundary: the start of the data area
    sections  raw float32 little-endian, C order; each starts 64-byte aligned, zeros between.
              "offset" is relative to the start of the data area (so the header does not
              depend on its own length).
    32 bytes  SHA-256 of every byte before it; nothing follows.

Where the files of a run go (`last.cvae`, `epoch-NNNN.cvae`, `prior.cvae`) is cvae.rundir's
business; this module only reads and writes one file.
"""

import hashlib
import json
import math
import os
import struct

import numpy as np

import cvae
from cvae.atomic import atomic_open, json_default
from cvae.errors import CvaeError

MAGIC = b"CVAECKPT"
FORMAT_VERSION = 1
ALIGNMENT = 64
DIGEST_SIZE = 32
_PREFIX = struct.Struct("<8sIQ")
_FLOAT32 = np.dtype("<f4")
_MAX_DIMS = 32
# Non-contiguous or non-float32 sections are converted this many bytes at a time, so saving
# never holds a second full copy of a large array.
_CHUNK_BYTES = 1 << 20

# The one place every checkpoint passes through before anything is built from it: each kind's
# module (cvae.model, cvae.prior, cvae.classifier) registers, when it is imported, a
# check_checkpoint(meta, sections, path) that checks the header against the sections
# (architecture, sizes, digits) and raises CvaeError, and cvae.train one for a training
# checkpoint's position. Every reader of a kind goes through that kind's module, so its check
# is registered before its first load; this module, below them, never imports them.
KIND_CHECKS = {}
# Largest integer a header may hold where it counts something (steps, seeds, sizes): the
# kernels take them as 64-bit, and nothing cvae writes comes near.
MAX_COUNT = 2**63 - 1

SUFFIX = ".cvae"


def _align(n):
    return -(-n // ALIGNMENT) * ALIGNMENT




def _as_float_section(name, value):
    if not isinstance(name, str) or not name:
        raise ValueError(f"section names must be non-empty strings, got {name!r}")
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"section {name!r} has dtype {array.dtype}; checkpoints store float arrays only")
    return array


class _HashingWriter:
    """Forwards writes to a file while hashing them, so the digest needs no second pass."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.position = 0

    def write(self, data):
        self.sha256.update(data)
        self.file.write(data)
        self.position += memoryview(data).nbytes

    def pad_to(self, position):
        if position > self.position:
            self.write(bytes(position - self.position))


def _write_section(writer, array):
    if array.dtype == _FLOAT32 and array.flags.c_contiguous:
        writer.write(memoryview(array.reshape(-1)).cast("B"))
        return
    if array.ndim == 0 or array.size == 0:
        writer.write(np.ascontiguousarray(array, dtype=_FLOAT32).tobytes())
        return
    # Slicing the leading axis never copies, whatever the strides; only each chunk is converted.
    rows_per_chunk = max(1, _CHUNK_BYTES // (4 * array[0].size))
    for start in range(0, array.shape[0], rows_per_chunk):
        chunk = np.ascontiguousarray(array[start:start + rows_per_chunk], dtype=_FLOAT32)
        writer.write(memoryview(chunk.reshape(-1)).cast("B"))


def checkpoint_header(kind, meta, sections):
    """The JSON header save_checkpoint would write, as (header_dict, header_bytes, arrays)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"checkpoint kind must be a non-empty string, got {kind!r}")
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    # Sorted so the same content always gives the same bytes, whatever the dict's insertion order.
    arrays = {name: _as_float_section(name, sections[name]) for name in sorted(sections)}
    table = []
    offset = 0
    for name, array in arrays.items():
        offset = _align(offset)
        nbytes = array.size * 4
        table.append({"name": name, "shape": list(array.shape), "offset": offset, "nbytes": nbytes})
        offset += nbytes
    header = {
        "cvae_version": cvae.__version__,
        "dtype": "float32",
        "kind": kind,
        "meta": meta,
        "sections": table,
    }
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON-serializable: {e}") from None
    return header, text.encode("utf-8"), arrays


def save_checkpoint(path, kind, meta, sections):
    """Write a checkpoint atomically: readers see the old file or the complete new one.

    kind: e.g. "cvae" or "classifier", checked again on load. meta: JSON-serializable dict
    (numpy scalars/arrays are converted to numbers/lists). sections: name -> float array of any
    shape, contiguous or not; stored as float32 (wider floats are narrowed). Arrays are streamed
    straight into the temp file with a running SHA-256, never concatenated. Identical input
    gives a byte-identical file. Returns the header dict.
    """
    path = os.fspath(path)
    header, header_bytes, arrays = checkpoint_header(kind, meta, sections)
    try:
        with atomic_open(path, "wb") as f:
            writer = _HashingWriter(f)
            writer.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)))
            writer.write(header_bytes)
            data_start = _align(writer.position)
            writer.pad_to(data_start)  # the data area starts aligned even with no sections
            for entry, array in zip(header["sections"], arrays.values()):
                writer.pad_to(data_start + entry["offset"])
                _write_section(writer, array)
            f.write(writer.sha256.digest())
    except OSError as e:
        raise CvaeError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    return header


def _damaged(path, reason):
    return CvaeError(f"{path} is damaged: {reason}")


def _expected_size(data_start, table):
    ends = [entry["offset"] + entry["nbytes"] for entry in table]
    return data_start + max(ends, default=0) + DIGEST_SIZE


def _guess_expected_size(buffer, header_length):
    """Best-effort file size from a header we cannot trust yet, to tell truncation from corruption."""
    try:
        header = json.loads(bytes(buffer[_PREFIX.size:_PREFIX.size + header_length]))
        return _expected_size(_align(_PREFIX.size + header_length), header["sections"])
    except Exception:
        return None


def _reject_non_finite(text):
    raise ValueError(f"non-finite number {text}")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"non-finite number {text}")
    return value


def _parse_header(path, raw):
    """The header's JSON, refusing NaN and Infinity (Python's json reads them by default, and
    a NaN learning rate or loss is as poisonous as a NaN weight)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_non_finite,
                          parse_float=_finite_float)
    except UnicodeDecodeError:
        raise _damaged(path, "header is not valid JSON") from None
    except RecursionError:
        raise _damaged(path, "header is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        if "non-finite number" in str(e):
            raise _damaged(path, f"header holds a {str(e)[:60]}") from None
        raise _damaged(path, "header is not valid JSON") from None


def header_int(meta, key, path, low=0, high=MAX_COUNT, required=True):
    """meta[key] as an int in [low, high] (a JSON integer, not a bool, float or string);
    None when it is absent and not required. Anything else is a CvaeError naming the file."""
    if key not in meta:
        if required:
            raise _damaged(path, f"its header lacks {key!r}")
        return None
    value = meta[key]
    if type(value) is not int or not low <= value <= high:
        raise _damaged(path, f"{key!r} in its header is {value!r:.40}, not an integer in "
                             f"[{low}, {high}]")
    return value


def header_numbers(meta, key, path, low=-math.inf, high=math.inf, required=True):
    """meta[key], a JSON number or list of numbers, each in [low, high] (finite: the parser
    refuses NaN and Infinity). Not a string: float("nan") would take one. None when absent and
    not required."""
    if key not in meta:
        if required:
            raise _damaged(path, f"its header lacks {key!r}")
        return None
    value = meta[key]
    values = value if isinstance(value, list) else [value]
    if not all(type(v) in (int, float) and low <= v <= high for v in values):
        raise _damaged(path, f"{key!r} in its header is {value!r:.40}, not numbers in "
                             f"[{low:g}, {high:g}]")
    return value


# Sections are checked this many floats at a time, so checking holds no second full-size array.
_CHECK_FLOATS = 1 << 18


def _check_finite(path, sections):
    for name, array in sections.items():
        flat = array.reshape(-1)
        for start in range(0, flat.size, _CHECK_FLOATS):
            chunk = flat[start:start + _CHECK_FLOATS]
            if not np.isfinite(chunk).all():
                bad = start + int(np.flatnonzero(~np.isfinite(chunk))[0])
                raise _damaged(path, f"section {name!r} holds {flat[bad]} at index {bad} (every "
                                     f"stored value must be finite)")


def register_kind_check(kind, check):
    """check(meta, sections, path) runs on every file of `kind` that load_checkpoint reads
    (after the checks registered before it: the network's, then e.g. the training's)."""
    KIND_CHECKS.setdefault(kind, [])
    if check not in KIND_CHECKS[kind]:
        KIND_CHECKS[kind].append(check)


def _check_kind(path, kind, meta, sections):
    for check in KIND_CHECKS.get(kind, ()):
        check(meta, sections, path)


def _validate_table(path, table, data_size):
    """Check the section table against the data area; returns {name: (shape, offset, nbytes)}."""
    if not isinstance(table, list):
        raise _damaged(path, "section table is not a list")
    checked = {}
    for entry in table:
        if not (isinstance(entry, dict) and {"name", "shape", "offset", "nbytes"} <= entry.keys()):
            raise _damaged(path, f"malformed section entry {entry!r:.80}")
        name, shape, offset, nbytes = entry["name"], entry["shape"], entry["offset"], entry["nbytes"]
        if not isinstance(name, str) or not name or name in checked:
            raise _damaged(path, f"bad or duplicate section name {name!r:.80}")
        # numpy 1.x builds arrays of up to 32 dimensions (2.x: 64); cvae writes at most 2.
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                and all(type(d) is int and d >= 0 for d in shape)):
            raise _damaged(path, f"section {name!r} has a bad shape {shape!r:.80}")
        if type(offset) is not int or type(nbytes) is not int or offset < 0 or offset % ALIGNMENT:
            raise _damaged(path, f"section {name!r} has a bad offset {offset!r:.40}")
        if nbytes != 4 * math.prod(shape):
            raise _damaged(path, f"section {name!r} is {nbytes} bytes but shape {shape} needs {4 * math.prod(shape)}")
        if offset + nbytes > data_size:
            raise _damaged(path, f"section {name!r} extends past the end of the file")
        checked[name] = (tuple(shape), offset, nbytes)
    # Empty sections occupy no bytes, so they cannot overlap anything wherever they point.
    spans = sorted((offset, offset + nbytes, name) for name, (_, offset, nbytes) in checked.items() if nbytes)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise _damaged(path, f"sections {first!r} and {second!r} overlap")
    return checked


def load_checkpoint(path, expected_kind=None):
    """Read and fully verify a checkpoint; returns (meta, sections, header).

    sections maps name -> float32 array of the stored shape, in the file's (sorted) order. The
    arrays are writable and do not alias each other; they are views into one private buffer
    holding the file, so loading costs a single read and no copies. header is the parsed JSON
    header (including "kind", "cvae_version" and the section table).

    Raises CvaeError naming the file for anything wrong: unreadable, not a checkpoint, newer
    format, damaged (checksum, truncation, inconsistent table, a NaN or Inf anywhere) or the
    wrong kind. A file of a kind in KIND_CHECKS is also checked against that kind's
    architecture (sizes within bounds and matching the sections, digits, position), so
    whatever command loads it can build its network without a further check. The file is
    only ever parsed as JSON and raw floats; nothing in it is executed.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if prefix[:len(MAGIC)] != MAGIC:
                what = "it is empty" if not prefix else "wrong magic bytes"
                raise CvaeError(f"{path} is not a cvae checkpoint ({what})")
            if len(prefix) < _PREFIX.size:
                raise _damaged(path, "truncated inside the file header")
            _, version, header_length = _PREFIX.unpack(prefix)
            if version > FORMAT_VERSION:
                raise CvaeError(
                    f"{path} was written by a newer cvae (checkpoint format {version}; this cvae "
                    f"{cvae.__version__} reads format {FORMAT_VERSION}): upgrade cvae to load it"
                )
            if version < 1:
                raise _damaged(path, f"invalid checkpoint format version {version}")
            file_size = os.fstat(f.fileno()).st_size
            # Checked before anything is allocated, so a corrupt length cannot exhaust memory.
            if _PREFIX.size + header_length + DIGEST_SIZE > file_size:
                raise _damaged(path, f"header length {header_length} exceeds the file size {file_size}")
            buffer = bytearray(file_size)
            buffer[:_PREFIX.size] = prefix
            if f.readinto(memoryview(buffer)[_PREFIX.size:]) != file_size - _PREFIX.size:
                raise _damaged(path, "file changed size while being read")
    except OSError as e:
        raise CvaeError(f"cannot read checkpoint {path}: {e.strerror or e}") from None

    data_start = _align(_PREFIX.size + header_length)
    body = memoryview(buffer)[:file_size - DIGEST_SIZE]
    if hashlib.sha256(body).digest() != bytes(buffer[file_size - DIGEST_SIZE:]):
        expected = _guess_expected_size(buffer, header_length)
        if expected is not None and expected != file_size:
            how = "truncated" if file_size < expected else "has extra bytes"
            raise _damaged(path, f"checksum mismatch; {how} ({file_size} bytes, header describes {expected})")
        raise _damaged(path, "checksum mismatch")

    header = _parse_header(path, bytes(buffer[_PREFIX.size:_PREFIX.size + header_length]))
    if not isinstance(header, dict) or not {"kind", "meta", "sections", "dtype"} <= header.keys():
        raise _damaged(path, "header lacks kind/meta/sections/dtype")
    if not isinstance(header["kind"], str):
        raise _damaged(path, "kind is not a string")
    if header["dtype"] != "float32":
        raise _damaged(path, f"unsupported dtype {header['dtype']!r:.40}")
    if not isinstance(header["meta"], dict):
        raise _damaged(path, "meta is not an object")
    data_size = file_size - DIGEST_SIZE - data_start
    if data_size < 0:
        raise _damaged(path, "no room for the data area")
    table = _validate_table(path, header["sections"], data_size)
    expected = _expected_size(data_start, header["sections"])
    if expected != file_size:
        raise _damaged(path, f"file is {file_size} bytes but its header describes {expected}")

    kind = header["kind"]
    if expected_kind is not None and kind != expected_kind:
        raise CvaeError(f"{path} is a {kind!r:.60} checkpoint, not a {expected_kind!r} checkpoint")

    sections = {
        name: np.frombuffer(buffer, dtype=_FLOAT32, count=nbytes // 4, offset=data_start + offset).reshape(shape)
        for name, (shape, offset, nbytes) in table.items()
    }
    # Header against sections first: it is cheap, and a wrong architecture is the clearer message.
    _check_kind(path, kind, header["meta"], sections)
    _check_finite(path, sections)
    return header["meta"], sections, header
