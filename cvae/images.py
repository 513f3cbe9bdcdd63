"""Binary PGM (P5) output, contact sheets of 28x28 digits with a JSON sidecar, a strict reader,
and a minimal greyscale PNG encoder (for the HTML report).

Pixels are white digit on black: probability 1 is 255. Every file goes through cvae.atomic.
"""

import json
import math
import os
import re
import struct
import zlib

import numpy as np

from cvae.atomic import atomic_open, json_default
from cvae.errors import CvaeError

CELL = 28
# Keys write_sheet puts in every cell; per-cell extras may not shadow them or scripts would misplace cells.
_RESERVED_CELL_KEYS = frozenset({"x", "y", "label", "row", "col", "index", "source"})


def to_uint8(pixels):
    """Probabilities in [0, 1] -> uint8 via round(255 * p), clipped; uint8 passes through unchanged.

    Rounding is half-to-even (numpy.rint), matching Python's round().
    """
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:
        return pixels
    if not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"pixels must be float probabilities or uint8, not {pixels.dtype}")
    if np.isnan(pixels).any():
        raise CvaeError("image contains NaN pixels (the model's weights have probably diverged)")
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def pgm_bytes(pixels):
    """The complete P5 file for a 2-D image: header `P5\\n{W} {H}\\n255\\n` then row-major bytes."""
    image = to_uint8(pixels)
    if image.ndim != 2 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"a PGM needs a non-empty 2-D image, got shape {image.shape}")
    height, width = image.shape
    return f"P5\n{width} {height}\n255\n".encode("ascii") + np.ascontiguousarray(image).tobytes()


def write_pgm(path, pixels):
    """Write a 2-D image (float probabilities or uint8) as a binary PGM, atomically."""
    data = pgm_bytes(pixels)
    try:
        with atomic_open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise CvaeError(f"cannot write {os.fspath(path)}: {e.strerror or e}") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bytes(pixels, level=9):
    """The complete PNG file of a 2-D greyscale image (float probabilities or uint8, as
    pgm_bytes): 8-bit greyscale (colour type 0), no interlace, every row with filter 0 (none),
    one zlib IDAT chunk. The same pixels always give the same bytes (no time or text chunks).
    """
    image = to_uint8(pixels)
    if image.ndim != 2 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"a PNG needs a non-empty 2-D image, got shape {image.shape}")
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # a filter-type byte (0) per row
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + _png_chunk(b"IEND", b""))


_PGM_HEADER = re.compile(rb"P5(?:\s|#[^\n\r]*[\n\r])+")
_PGM_FIELD = re.compile(rb"(\d+)(?:\s|#[^\n\r]*[\n\r])+")
# Exactly one whitespace byte separates maxval from the pixels, so a first pixel value that
# happens to be a whitespace byte must not be eaten by a greedy pattern.
_PGM_MAXVAL = re.compile(rb"(\d+)\s")


def read_pgm(path):
    """Read an 8-bit binary PGM (maxval 255) into a (H, W) uint8 array.

    Accepts the full P5 header grammar (any whitespace, comments) because other tools write
    those, but rejects everything else: other magics, maxval != 255, missing or extra pixel
    bytes. Every problem is a CvaeError naming the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CvaeError(f"cannot read {path}: {e.strerror or e}") from None
    magic = _PGM_HEADER.match(data)
    if magic is None:
        raise CvaeError(f"{path} is not a binary PGM (P5) image")
    position = magic.end()
    fields = []
    for name in ("width", "height", "maxval"):
        match = (_PGM_MAXVAL if name == "maxval" else _PGM_FIELD).match(data, position)
        if match is None:
            raise CvaeError(f"{path} is a malformed PGM: bad or missing {name}")
        # Python refuses int() of more than 4300 digits (ValueError); no real size needs 10.
        digits = match.group(1).lstrip(b"0") or b"0"
        if len(digits) > 9:
            raise CvaeError(f"{path} is a malformed PGM: its {name} has {len(digits)} digits")
        fields.append(int(digits))
        position = match.end()
    width, height, maxval = fields
    if width == 0 or height == 0:
        raise CvaeError(f"{path} is a malformed PGM: size {width}x{height}")
    if maxval != 255:
        raise CvaeError(f"{path} has maxval {maxval}; only 8-bit PGMs with maxval 255 are supported")
    expected = width * height
    found = len(data) - position
    if found < expected:
        raise CvaeError(f"{path} is truncated: {found} pixel bytes, expected {expected}")
    if found > expected:
        raise CvaeError(f"{path} has {found - expected} unexpected bytes after the pixels")
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=position).reshape(height, width).copy()


def sidecar_path(pgm_path):
    """`digits.pgm` -> `digits.json`; sheets must end in .pgm so the sidecar can never be the PGM itself."""
    pgm_path = os.fspath(pgm_path)
    stem, suffix = os.path.splitext(pgm_path)
    if suffix.lower() != ".pgm":
        raise CvaeError(f"sheet file name must end in .pgm: {pgm_path}")
    return stem + ".json"


def numbered_sheet_path(path, number):
    """`digits.pgm`, 3 -> `digits-0003.pgm` (1-based; grows past 4 digits if needed)."""
    sidecar_path(path)
    stem, suffix = os.path.splitext(os.fspath(path))
    return f"{stem}-{number:04d}{suffix}"


def split_into_sheets(n_items, max_rows, cols):
    """Cut n_items (filled row by row, cols per row) into sheets of at most max_rows rows.

    Returns a list of (start, stop) item ranges, one per sheet, in order; [] for no items.
    """
    if cols < 1 or max_rows < 1:
        raise ValueError(f"cols and max_rows must be positive, got cols={cols}, max_rows={max_rows}")
    if n_items < 0:
        raise ValueError(f"n_items must be non-negative, got {n_items}")
    per_sheet = max_rows * cols
    return [(start, min(start + per_sheet, n_items)) for start in range(0, n_items, per_sheet)]


def sheet_geometry(n_cells, cols, cell=CELL, gutter=2):
    """(rows, width, height) of a grid with gutters between cells but not around the edge."""
    rows = math.ceil(n_cells / cols)
    return rows, cols * (cell + gutter) - gutter, rows * (cell + gutter) - gutter


def _as_cells(images, cell):
    images = np.asarray(images)
    if images.ndim == 3 and images.shape[1:] == (cell, cell):
        images = images.reshape(len(images), cell * cell)
    if images.ndim != 2 or images.shape[1] != cell * cell:
        raise ValueError(f"expected images of shape (n, {cell * cell}) or (n, {cell}, {cell}), got {images.shape}")
    return to_uint8(images).reshape(len(images), cell, cell)


def render_sheet(images, cols, cell=CELL, gutter=2):
    """Tile images row by row into one uint8 canvas; unused trailing cells and gutters are black."""
    cells = _as_cells(images, cell)
    n = len(cells)
    if n == 0:
        raise ValueError("a sheet needs at least one image")
    if cols < 1 or gutter < 0:
        raise ValueError(f"need cols >= 1 and gutter >= 0, got cols={cols}, gutter={gutter}")
    rows, width, height = sheet_geometry(n, cols, cell, gutter)
    pitch = cell + gutter
    canvas = np.zeros((height, width), dtype=np.uint8)
    # The cells as a (rows, cols, cell, cell) view of the canvas itself (cell (r, c) has its
    # top-left pixel at (r * pitch, c * pitch)), so every pixel is copied once, straight to
    # its place: a sheet of 1000 digits is laid out in about a millisecond.
    grid = np.lib.stride_tricks.as_strided(
        canvas, shape=(rows, cols, cell, cell),
        strides=(pitch * width, pitch, width, 1), writeable=True)
    full = n // cols
    grid[:full] = cells[:full * cols].reshape(full, cols, cell, cell)
    if n > full * cols:
        grid[full, :n - full * cols] = cells[full * cols:]
    return canvas


#: One encoder for every cell: json.dumps with options builds a new encoder per call, which
#: cost more than the encoding itself at 100,000 cells.
_CELL_ENCODER = json.JSONEncoder(sort_keys=True, default=json_default, allow_nan=False)


def _sidecar_text(document):
    """Pretty JSON with one cell per line, so a 1000-cell sheet stays greppable and small."""
    encode = _CELL_ENCODER.encode
    return _document_text(document, ["    " + encode(c) for c in document["cells"]])


def _document_text(document, cell_lines):
    """The sidecar: document's fields but "cells" as json.dumps(indent=2, sort_keys=True)
    writes them, then the cells, one already encoded line each."""
    head = {key: value for key, value in document.items() if key != "cells"}
    text = json.dumps(head, indent=2, sort_keys=True, default=json_default, allow_nan=False)
    assert text.endswith("\n}")
    return text[:-2] + ',\n  "cells": [\n' + ",\n".join(cell_lines) + "\n  ]\n}\n"


def _group_lines(n, cols, cell, gutter, first_index, groups):
    """The sidecar lines of n cells described by groups (see write_sheet_groups), in cell
    order: the very text of _CELL_ENCODER.encode of each cell's dict, made with one %-template
    per group instead of a dict and an encoder call per cell."""
    lines = [None] * n
    pitch = cell + gutter
    covered = 0
    for where, values in groups:
        where = np.asarray(where, dtype=np.int64)
        if where.ndim != 1 or (len(where) and (where.min() < 0 or where.max() >= n)):
            raise ValueError(f"a group's cells must be indices in [0, {n})")
        if len(where) == 0:
            continue
        if "label" not in values:
            raise ValueError("every group of cells needs a label (an int column or None)")
        clash = _RESERVED_CELL_KEYS.difference({"label", "source"}).intersection(values)
        if clash:
            raise ValueError(f"cell extras may not override {sorted(clash)}")
        row, col = np.divmod(where, cols)
        columns = {"x": col * pitch, "y": row * pitch, "row": row, "col": col,
                   "index": where + first_index}
        constants = {}
        for key, value in values.items():
            if isinstance(value, np.ndarray):
                if not np.issubdtype(value.dtype, np.integer) or value.shape != where.shape:
                    raise ValueError(f"column {key!r} must be {len(where)} integers")
                columns[key] = value
            else:
                constants[key] = value
        parts, args = [], []
        for key in sorted({**columns, **constants}):
            name = _CELL_ENCODER.encode(key).replace("%", "%%")
            if key in columns:
                parts.append(name + ": %d")
                args.append(columns[key].tolist())
            else:
                parts.append(name + ": " + _CELL_ENCODER.encode(constants[key]).replace("%", "%%"))
        template = "    {" + ", ".join(parts) + "}"
        made = map(template.__mod__, zip(*args))
        if len(where) == n and covered == 0 and np.array_equal(where, np.arange(n)):
            lines = list(made)
        else:
            for i, line in zip(where.tolist(), made):
                lines[i] = line
        covered += len(where)
    if covered != n or None in lines:
        raise ValueError(f"the groups must cover each of the {n} cells exactly once")
    return lines


def write_sheet(path, cells_images, labels, cols, cell=CELL, gutter=2, sources=None, extra=None,
                cell_extras=None, first_index=0):
    """Write a grid of digits as `path` (PGM) plus `path` with .json (the sidecar), both atomically.

    cells_images: (n, cell*cell) or (n, cell, cell), float probabilities in [0, 1] or uint8,
    laid out row by row, `cols` per row. labels: n labels (int or None). sources: optional n
    source indices (None entries are omitted). cell_extras: optional n dicts merged into each
    cell. first_index: the global index of the first image, for sheets cut from a longer list.

    Sidecar: {"rows", "cols", "cell", "gutter", "width", "height", "extra", "cells": [{"x", "y",
    "row", "col", "index", "label", ["source"], ...extras}]}, x/y being the top-left pixel of
    the cell. Returns the sidecar document.
    """
    path = os.fspath(path)
    json_path = sidecar_path(path)
    canvas = render_sheet(cells_images, cols, cell, gutter)
    n = len(labels)
    if n != len(cells_images):
        raise ValueError(f"{len(cells_images)} images but {n} labels")
    for name, values in (("sources", sources), ("cell_extras", cell_extras)):
        if values is not None and len(values) != n:
            raise ValueError(f"{n} images but {len(values)} {name}")
    height, width = canvas.shape
    cells = []
    for i, label in enumerate(labels):
        row, col = divmod(i, cols)
        entry = {
            "x": col * (cell + gutter),
            "y": row * (cell + gutter),
            "row": row,
            "col": col,
            "index": first_index + i,
            "label": None if label is None else int(label),
        }
        if sources is not None and sources[i] is not None:
            entry["source"] = int(sources[i])
        if cell_extras is not None and cell_extras[i]:
            clash = _RESERVED_CELL_KEYS.intersection(cell_extras[i])
            if clash:
                raise ValueError(f"cell extras may not override {sorted(clash)}")
            entry.update(cell_extras[i])
        cells.append(entry)
    document = {
        "rows": math.ceil(n / cols),
        "cols": cols,
        "cell": cell,
        "gutter": gutter,
        "width": width,
        "height": height,
        "extra": dict(extra or {}),
        "cells": cells,
    }
    try:
        text = _sidecar_text(document)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sheet metadata is not JSON-serializable: {e}") from None
    _write_sheet_files(path, json_path, canvas, text)
    return document


def write_sheet_groups(path, cells_images, cols, groups, cell=CELL, gutter=2, extra=None,
                       first_index=0):
    """write_sheet for sheets of many cells whose extras come in a few shapes (a sample sheet:
    samples and blanks): the same files, byte for byte, as write_sheet given the same cells,
    without a Python dict per cell.

    groups: [(cells, values)], each cell (an index into cells_images) in exactly one group;
    values maps a key to a constant (any JSON value, the same for the group's cells) or to an
    integer numpy array with one entry per cell of the group. Every group has "label" (None,
    an int or a column); "source" is optional; x, y, row, col and index are computed as by
    write_sheet. Returns the sidecar document without its "cells".
    """
    path = os.fspath(path)
    json_path = sidecar_path(path)
    canvas = render_sheet(cells_images, cols, cell, gutter)
    n = len(cells_images)
    height, width = canvas.shape
    document = {"rows": math.ceil(n / cols), "cols": cols, "cell": cell, "gutter": gutter,
                "width": width, "height": height, "extra": dict(extra or {})}
    try:
        text = _document_text(document, _group_lines(n, cols, cell, gutter, first_index,
                                                      groups))
    except (TypeError, ValueError) as e:
        raise ValueError(f"sheet metadata is not JSON-serializable: {e}") from None
    _write_sheet_files(path, json_path, canvas, text)
    return document


def _write_sheet_files(path, json_path, canvas, text):
    """The PGM of canvas (a uint8 2-D C-contiguous array) at path and its sidecar text at
    json_path, in the order that keeps the invariant below."""
    height, width = canvas.shape
    # The header and the pixels go to the file one after the other: pgm_bytes's one bytes
    # object would copy every pixel once more.
    header = f"P5\n{width} {height}\n255\n".encode("ascii")
    # Invariant for scripts: a PGM on disk always has the sidecar that describes it. So both
    # temp files are complete before anything is renamed, an old PGM is removed before its
    # sidecar is replaced, and the PGM is renamed last. A crash can leave a sidecar without a
    # PGM (harmless: scripts start from PGMs) but never a PGM beside a stale or missing sidecar.
    # Both files are on disk (fsync) before the old PGM is removed, so a full disk fails
    # before anything changed (atomic_open's own fsync then finds nothing left to write).
    try:
        with atomic_open(path, "wb") as pgm_file:
            pgm_file.write(header)
            pgm_file.write(memoryview(canvas).cast("B"))
            pgm_file.flush()
            os.fsync(pgm_file.fileno())
            with atomic_open(json_path, "wb") as json_file:
                json_file.write(text.encode("ascii"))
                json_file.flush()
                os.fsync(json_file.fileno())
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
    except OSError as e:
        raise CvaeError(f"cannot write {path}: {e.strerror or e}") from None


def sheet_files(path, n_cells, max_rows, cols):
    """[(number, path, start, stop)]: the sheets write_sheets makes of n_cells cells, each
    with its 1-based number, file (`path` itself when there is one sheet, else
    NAME-0001.pgm, ...) and cell range. Lets a caller make and write one sheet at a time."""
    ranges = split_into_sheets(n_cells, max_rows, cols)
    if not ranges:
        raise ValueError("no images to write")
    return [(number, os.fspath(path) if len(ranges) == 1 else numbered_sheet_path(path, number),
             start, stop) for number, (start, stop) in enumerate(ranges, 1)]


def write_sheets(path, cells_images, labels, cols, max_rows, cell=CELL, gutter=2, sources=None, extra=None,
                 cell_extras=None):
    """Write as many sheets as needed, each at most max_rows rows; returns the PGM paths written.

    If everything fits on one sheet it is written to `path` itself; otherwise to
    `NAME-0001.pgm`, `NAME-0002.pgm`, ... Cell "index" values stay global across sheets, and
    each sidecar's extra gains "sheet" (1-based) and "sheets" (the total).
    """
    sheets = sheet_files(path, len(cells_images), max_rows, cols)
    written = []
    for number, sheet_path, start, stop in sheets:
        write_sheet(
            sheet_path,
            cells_images[start:stop],
            labels[start:stop],
            cols,
            cell=cell,
            gutter=gutter,
            sources=None if sources is None else sources[start:stop],
            extra={**(extra or {}), "sheet": number, "sheets": len(sheets)},
            cell_extras=None if cell_extras is None else cell_extras[start:stop],
            first_index=start,
        )
        written.append(sheet_path)
    return written
