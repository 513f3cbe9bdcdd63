"""Digit sheets: samples of a prior, reconstructions and latent interpolations of test digits.

Every sheet is a PGM with a JSON sidecar (cvae.images.write_sheet): each cell has x, y, label
and a "kind" (original, reconstruction, sample, interpolation, class, blank), and the
sidecar's "extra" records the checkpoint, seed and settings that produced it.

Encoding and decoding go through cvae.model's batched calls; the only Python loops are per
batch or per sheet row, never per image.

Conventions:
  * Digits. A checkpoint was trained on meta["digits"]; asking for another digit is an error
    (the one-hot input exists, but a class never seen in training decodes to noise).
  * Reconstructions are the decoder's mean at z = mu: sigmoid(decoder(mu(x, y), y)).
  * Interpolations use same-label pairs: row r takes two random test images of digit
    digits[r % len(digits)], encodes both to mu and decodes the straight line between them
    (endpoints included) with that label; the true originals frame the row. Keeping the label
    fixed shows how the latent space varies style within a class, with no jump where a label
    would switch.
  * Class sheets fix z (the mu of a test image: its "style") for each row and decode it with
    every trained digit along the row, after the original itself.
  * Test-image "source" is the image's index in the MNIST test file (for write_run_images:
    its row in the dataset it is given).
"""

import collections
import concurrent.futures
import math
import os
import time

import numpy as np

from cvae.data import PIXELS_PER_IMAGE as N_PIXELS
from cvae.data import digits_text, write_generated_idx
from cvae.errors import CvaeError
from cvae.images import sheet_files, write_sheet, write_sheet_groups
from cvae.model import decode_images, encode_all
from cvae.prior import GaussianPrior

DEFAULT_N = 64            # reconstruct: test digits (each shown beside its reconstruction)
RECON_PAIRS_PER_ROW = 8   # reconstruct: original|reconstruction pairs per row
DEFAULT_PER_DIGIT = 10
MAX_AUTO_COLS = 20        # generate: per-digit samples fill one row up to this many columns
DEFAULT_MAX_ROWS = 50
DEFAULT_STEPS = 10
DEFAULT_PAIRS = 5
DEFAULT_BATCH = 256       # rows per kernel call for the commands' model


# ---------------------------------------------------------------- test digit selection


def pick_balanced(dataset, digits, n, rng):
    """Up to n dataset indices spread evenly over digits (round-robin over shuffled per-digit
    lists), ordered by label then index."""
    labels = np.asarray(dataset.labels)
    candidates = rng.permutation(dataset.rows_of(digits))
    if len(candidates) == 0:
        raise CvaeError(f"{dataset.name} has no images of digits {digits_text(digits)}")
    # Rank of each candidate among the shuffled candidates of its digit: taking ranks 0, 1, ...
    # in turn gives every digit its share even when some digits have few images.
    cand_labels = labels[candidates]
    order = np.argsort(cand_labels, kind="stable")
    sorted_labels = cand_labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(candidates), dtype=np.int64)
    rank[order] = np.arange(len(candidates)) - first
    chosen = candidates[np.lexsort((cand_labels, rank))[:n]]
    return chosen[np.lexsort((chosen, labels[chosen]))]


def pick_pairs(dataset, digits, pairs, rng):
    """(starts, ends): for row r two distinct random images of digit digits[r % len(digits)]
    (the same image twice only if that digit has a single one)."""
    labels = np.asarray(dataset.labels)
    starts, ends = [], []
    by_digit = {d: np.flatnonzero(labels == d) for d in digits}
    for d, found in by_digit.items():
        if len(found) == 0:
            raise CvaeError(f"{dataset.name} has no images of digit {d}")
    for r in range(pairs):  # per row, not per image
        found = by_digit[digits[r % len(digits)]]
        if len(found) == 1:
            a = b = found[0]
        else:
            a, b = rng.choice(found, size=2, replace=False)
        starts.append(a)
        ends.append(b)
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


# ---------------------------------------------------------------- the sheets


def reconstruction_sheet(model, dataset, digits, path, n=DEFAULT_N, seed=0, extra=None):
    """Write test digits beside their reconstructions: pairs of columns original|reconstruction,
    RECON_PAIRS_PER_ROW pairs per row. Returns ([path], number of test digits shown)."""
    rng = np.random.default_rng(seed)
    chosen = pick_balanced(dataset, digits, n, rng)
    pixels = np.take(np.asarray(dataset.images), chosen, axis=0)
    labels = np.asarray(dataset.labels)[chosen].astype(np.uint8)
    recon = decode_images(model, encode_all(model, pixels, labels)[0], labels)
    k = len(chosen)
    images = np.empty((2 * k, N_PIXELS), dtype=np.uint8)
    images[0::2] = pixels
    images[1::2] = recon
    cell_labels = np.repeat(labels, 2).tolist()
    sources = np.repeat(chosen, 2).tolist()
    kinds = [{"kind": "original"}, {"kind": "reconstruction"}] * k
    cols = 2 * min(RECON_PAIRS_PER_ROW, k)
    write_sheet(path, images, cell_labels, cols, sources=sources, cell_extras=kinds,
                extra={"what": "pairs of columns: a test digit, then its reconstruction at "
                               "z = mu", "seed": seed, "digits": list(digits),
                       **(extra or {})})
    return [os.fspath(path)], k


#: Digits draw their z in blocks of DRAW_BLOCK, by global index (see KeyedNormals).
DRAW_BLOCK = 65536


class KeyedNormals:
    """The N(0, I) normals of digits first, first + 1, ... in a generation, each row keyed by
    the digit's global index i (0-based, over all the digits asked for, in sheet order), never
    by which job or sheet draws it: so any shard of a generation draws what the whole run
    draws for the same digits.

    Digit i takes the (i mod DRAW_BLOCK)-th row of block b = i // DRAW_BLOCK: block 0 is
    numpy's default_rng(seed) (so up to 65,536 digits get exactly the draws cvae made before
    generation had blocks, and that `cvae eval` makes), block b > 0 is default_rng of
    SeedSequence(seed, spawn_key=(b,)), numpy's independent child stream. Rows within a block
    are consecutive draws of its stream, so starting at row r costs r rows of draws, at most
    one block's.

    It stands in for the numpy Generator a prior's draw() takes (cvae.prior: only
    standard_normal((n, latent), dtype) is called); each call continues where the last
    stopped.
    """

    def __init__(self, seed, first=0):
        self.seed, self.next = int(seed), int(first)
        self._block, self._rng = None, None

    def _stream(self, block, row, shape_tail, dtype):
        """The block's generator, positioned at `row` (only ever moved forward)."""
        if self._block != block or self._row > row:
            seed = (self.seed if block == 0
                    else np.random.SeedSequence(self.seed, spawn_key=(block,)))
            self._block, self._rng, self._row = block, np.random.default_rng(seed), 0
        while self._row < row:  # skip in bounded pieces: memory stays small
            skip = min(row - self._row, 4096)
            self._rng.standard_normal((skip, *shape_tail), dtype=dtype)
            self._row += skip
        return self._rng

    def standard_normal(self, shape, dtype=np.float32):
        n, *tail = shape
        out = np.empty(shape, dtype=dtype)
        done = 0
        while done < n:
            block, row = divmod(self.next, DRAW_BLOCK)
            take = min(n - done, DRAW_BLOCK - row)
            # drawn straight into out (the same draws as a new array's, without its copy)
            self._stream(block, row, tail, dtype).standard_normal(dtype=dtype,
                                                                  out=out[done:done + take])
            self._row += take
            self.next += take
            done += take
        return out


def codes_ahead(draws, items, count, latent, codes, waited):
    """(item, codes(item, z)) for each of `items`, z = draws.standard_normal((count(item),
    latent)) in order: the same draws as drawing in the caller's loop, made codes by `codes`
    (a prior's from_normals). Item k + 1's are drawn and made codes on a second thread while
    the caller decodes item k: numpy fills and the kernels run with the GIL released, so
    neither the serial draw (a tenth of a large N(0, I) generation) nor the flow prior's ODE
    (in the loop, it ran while the writer and drawing threads took the cores: twice its time
    alone) stops the decoding threads. waited[0] gathers the seconds the caller waited."""
    def make(item):
        return codes(item, draws.standard_normal((count(item), latent)))

    def result(future):
        began = time.perf_counter()
        z = future.result()
        waited[0] += time.perf_counter() - began
        return z

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as drawer:
        pending = None
        for item in items:
            future = drawer.submit(make, item)
            if pending is not None:
                yield pending[0], result(pending[1])
            pending = item, future
        if pending is not None:
            yield pending[0], result(pending[1])


def sheet_cells(digits, per_digit, cols, start, stop):
    """Cells start .. stop - 1 of the sample sheets' layout: `per_digit` samples of each digit,
    each digit starting a new row (cols per row), its last row padded with blanks.

    Returns (labels (k,) int64, -1 for blanks; sample number within its digit, -1 for blanks;
    the sample's global index over all digits, -1 for blanks).
    """
    block = math.ceil(per_digit / cols) * cols
    digit, position = np.divmod(np.arange(start, stop, dtype=np.int64), block)
    real = position < per_digit
    labels = np.where(real, np.asarray(digits, dtype=np.int64)[digit], -1)
    return labels, np.where(real, position, -1), np.where(real, digit * per_digit + position, -1)


def sample_groups(labels, sample_number):
    """The cells of sheet_cells as cvae.images.write_sheet_groups takes them: samples
    {"kind": "sample", "label", "sample"} and blanks {"kind": "blank", "label": null}."""
    real = labels >= 0
    blank = np.flatnonzero(~real)
    groups = [(np.flatnonzero(real), {"kind": "sample", "label": labels[real],
                                      "sample": sample_number[real]})]
    return groups + [(blank, {"kind": "blank", "label": None})] if len(blank) else groups


def sample_cell_count(digits, per_digit, cols):
    """Cells of the sample sheets, blanks included."""
    return len(digits) * math.ceil(per_digit / cols) * cols


#: One sample sheet's cells (sheet_cells), with its number, file and first cell.
SheetCells = collections.namedtuple("SheetCells", "number path start labels sample_number real")


def sample_sheets(model, digits, path, per_digit=DEFAULT_PER_DIGIT, temperature=1.0, seed=0,
                  cols=None, max_rows=DEFAULT_MAX_ROWS, extra=None, prior=None, shard=None,
                  progress=None):
    """Class-conditional samples of `prior` (cvae.prior: GaussianPrior, z ~ N(0, T² I), by
    default, or FlowSampler) from KeyedNormals(seed) draws in cell order, decoded with
    their digit's label; one row per digit when per_digit <= cols.

    cols defaults to min(per_digit, MAX_AUTO_COLS). Every digit starts on a new row; a digit's
    unfilled last row is padded with blank cells (black, label null, kind "blank"). More than
    max_rows rows are split into numbered sheets (NAME-0001.pgm, ...), made and written one
    at a time (memory: one sheet). shard (cvae.shard.Shard): write only that shard's whole
    sheets, exactly as the unsharded run writes them. progress(sheets written, sheets to
    write), if given, is called after each sheet.
    Returns (paths written, digits generated, seconds spent sampling and decoding: decoding,
    and waiting for the codes, which another thread draws and carries through the prior
    while the sheet before decodes).
    """
    cols = cols or min(per_digit, MAX_AUTO_COLS)
    if prior is None:
        prior = GaussianPrior(model.arch.latent)
    sheets = sheet_files(path, sample_cell_count(digits, per_digit, cols), max_rows, cols)
    mine = sheets if shard is None else sheets[slice(*shard.share(len(sheets)))]
    common = {"what": f"class-conditional samples of the {prior.name} prior at the temperature, "
                      "one digit per row block",
              "temperature": temperature, "seed": seed, "digits": list(digits),
              "per_digit": per_digit, **prior.describe(os.path.dirname(os.path.abspath(path))),
              **(extra or {})}
    paths, n, seconds = [], 0, 0.0

    def write(number, sheet_path, start, images, labels, sample_number):
        write_sheet_groups(sheet_path, images, cols, sample_groups(labels, sample_number),
                           extra={**common, "sheet": number, "sheets": len(sheets)},
                           first_index=start)
        return sheet_path

    def cells(number, sheet_path, start, stop):
        labels, sample_number, _ = sheet_cells(digits, per_digit, cols, start, stop)
        return SheetCells(number, sheet_path, start, labels, sample_number, labels >= 0)

    # every row holds a real cell (a digit pads fewer than cols cells), and the real cells of
    # consecutive sheets have consecutive global indices: one stream of draws from the first
    first = sheet_cells(digits, per_digit, cols, mine[0][2], mine[0][2] + 1)[2][0] if mine else 0
    waited = [0.0]
    sheet_codes = codes_ahead(KeyedNormals(seed, first=int(first)),
                              (cells(*sheet) for sheet in mine),
                              lambda sheet: int(sheet.real.sum()), model.arch.latent,
                              lambda sheet, z: prior.from_normals(z, sheet.labels[sheet.real],
                                                                  temperature), waited)
    # One writer thread: sheet k is laid out and written (JSON, fsync) while the kernels,
    # which release the GIL, decode sheet k + 1. At most two sheets wait, so memory stays
    # that of a few sheets whatever the count.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        pending = collections.deque()
        for (number, sheet_path, start, labels, sample_number, real), z in sheet_codes:
            began = time.perf_counter()
            decoded = decode_images(model, z, labels[real])
            seconds += time.perf_counter() - began
            if real.all():
                images = decoded
            else:
                images = np.zeros((len(labels), N_PIXELS), dtype=np.uint8)
                images[real] = decoded
            n += int(real.sum())
            pending.append(writer.submit(write, number, sheet_path, start, images, labels,
                                         sample_number))
            while len(pending) > 2 or (pending and pending[0].done()):
                paths.append(pending.popleft().result())
                if progress is not None:
                    progress(len(paths), len(mine))
        while pending:
            paths.append(pending.popleft().result())
            if progress is not None:
                progress(len(paths), len(mine))
    return paths, n, seconds + waited[0]


#: Rows drawn, decoded and written at a time by generate_idx (784 bytes each).
IDX_BLOCK = 8192


def set_labels(digits, counts, first, last):
    """Labels (uint8) of rows first .. last - 1 of a generated set holding counts[i] digits
    digits[i], all of each digit in turn (equal counts: row // count's digit)."""
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    return np.asarray(digits, dtype=np.uint8)[
        np.searchsorted(ends, np.arange(first, last), side="right")]


def sample_blocks(model, digits, counts, rows, temperature=1.0, seed=0, prior=None,
                  spent=None, progress=None):
    """(images, labels) in blocks of IDX_BLOCK of rows (start, stop) of the generated set
    holding counts[i] digits digits[i], all of each digit in turn: row i's z from KeyedNormals
    (seed) row i, so any block or shard of a set draws what the whole set draws. spent[0]
    gathers the seconds spent sampling and decoding (as sample_sheets counts them);
    progress(rows done, rows) after each
    block."""
    if prior is None:
        prior = GaussianPrior(model.arch.latent)
    start, stop = rows
    blocks = ((first, min(first + IDX_BLOCK, stop)) for first in range(start, stop, IDX_BLOCK))
    spent = [0.0] if spent is None else spent
    for (first, last), z in codes_ahead(
            KeyedNormals(seed, first=start), blocks, lambda block: block[1] - block[0],
            model.arch.latent,
            lambda block, z: prior.from_normals(z, set_labels(digits, counts, *block),
                                                temperature), spent):
        labels = set_labels(digits, counts, first, last)
        began = time.perf_counter()
        images = decode_images(model, z, labels)
        spent[0] += time.perf_counter() - began
        yield images, labels
        if progress is not None:
            progress(last - start, stop - start)


def generated_set(model, digits, counts, temperature=1.0, seed=0, prior=None, progress=None):
    """(images (n, 784) uint8, labels (n,) uint8) in memory: the whole set of sample_blocks,
    n = sum(counts); what generate_idx writes for equal counts."""
    total = int(np.sum(counts))
    images = np.empty((total, N_PIXELS), dtype=np.uint8)
    labels = np.empty(total, dtype=np.uint8)
    row = 0
    for block_images, block_labels in sample_blocks(model, digits, counts, (0, total),
                                                    temperature, seed, prior,
                                                    progress=progress):
        images[row:row + len(block_labels)] = block_images
        labels[row:row + len(block_labels)] = block_labels
        row += len(block_labels)
    return images, labels


def generate_idx(model, digits, directory, per_digit=DEFAULT_PER_DIGIT, temperature=1.0, seed=0,
                 split="train", extra=None, prior=None, shard=None, progress=None):
    """The samples of sample_sheets (the same digits from the same draws, in the same order:
    all of the first digit, then the next ...) as an MNIST-format data set in `directory`:
    cvae.data.write_generated_idx's pair and JSON, or with shard (cvae.shard.Shard) its part
    of the rows, for cvae.data.merge_idx_parts. Streamed in blocks of IDX_BLOCK rows
    (sample_blocks). progress(rows written, rows to write), if given, is called after each
    block. Returns (files written, digits generated, seconds spent sampling and decoding)."""
    if prior is None:
        prior = GaussianPrior(model.arch.latent)
    total = len(digits) * per_digit
    start, stop = (0, total) if shard is None else shard.share(total)
    description = {"what": f"class-conditional samples of the {prior.name} prior at the "
                           "temperature, all of each digit in turn (as cvae generate's sheets "
                           "without their blank cells)",
                   "temperature": temperature, "seed": seed, "digits": list(digits),
                   "per_digit": per_digit, "counts": {str(d): per_digit for d in digits},
                   **prior.describe(os.path.abspath(directory)), **(extra or {})}
    spent = [0.0]
    blocks = sample_blocks(model, digits, [per_digit] * len(digits), (start, stop),
                           temperature, seed, prior, spent, progress)
    paths = write_generated_idx(directory, split, blocks, (start, stop), total, description,
                                shard=shard)
    return paths, stop - start, spent[0]


def interpolation_sheets(model, dataset, digits, path, classes_path, steps=DEFAULT_STEPS,
                         pairs=DEFAULT_PAIRS, seed=0, extra=None):
    """Two sheets, one row per pair (see the module docstring for the choices):

    path: original A | `steps` decodings of (1 - t)·mu_A + t·mu_B, t = 0 .. 1 | original B,
    all with the pair's (shared) label.
    classes_path: original A | z = mu_A decoded as each digit in `digits`.
    Returns the two paths.
    """
    rng = np.random.default_rng(seed)
    starts, ends = pick_pairs(dataset, digits, pairs, rng)
    images_all, labels_all = np.asarray(dataset.images), np.asarray(dataset.labels)
    ends_pixels = np.take(images_all, ends, axis=0)
    start_pixels = np.take(images_all, starts, axis=0)
    row_labels = labels_all[starts].astype(np.uint8)
    mu, _ = encode_all(model, np.concatenate([start_pixels, ends_pixels]),
                       np.concatenate([row_labels, labels_all[ends].astype(np.uint8)]))
    mu_a, mu_b = mu[:pairs], mu[pairs:]

    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    z = (mu_a[:, None, :] * (1 - t)[None, :, None] + mu_b[:, None, :] * t[None, :, None])
    path_images = decode_images(model, z.reshape(pairs * steps, -1), np.repeat(row_labels, steps))
    cols = steps + 2
    images = np.empty((pairs, cols, N_PIXELS), dtype=np.uint8)
    images[:, 0] = start_pixels
    images[:, 1:-1] = path_images.reshape(pairs, steps, N_PIXELS)
    images[:, -1] = ends_pixels
    cell_labels = np.repeat(row_labels, cols).tolist()
    sources, cell_extras = [], []
    t_values = [round(float(v), 6) for v in t]
    for a, b in zip(starts.tolist(), ends.tolist()):  # per row
        sources += [a] + [None] * steps + [b]
        cell_extras += ([{"kind": "original"}]
                        + [{"kind": "interpolation", "t": v, "from": a, "to": b} for v in t_values]
                        + [{"kind": "original"}])
    common = {"seed": seed, "digits": list(digits), **(extra or {})}
    write_sheet(path, images.reshape(-1, N_PIXELS), cell_labels, cols, sources=sources,
                cell_extras=cell_extras,
                extra={"what": "latent interpolation between two test digits of the same label "
                               "(z = mu), framed by the originals", "steps": steps,
                       "pairs": pairs, **common})

    n_classes = len(digits)
    class_labels = np.tile(np.asarray(digits, dtype=np.uint8), pairs)
    class_images = decode_images(model, np.repeat(mu_a, n_classes, axis=0), class_labels)
    cols = n_classes + 1
    grid = np.empty((pairs, cols, N_PIXELS), dtype=np.uint8)
    grid[:, 0] = start_pixels
    grid[:, 1:] = class_images.reshape(pairs, n_classes, N_PIXELS)
    cell_labels, sources, cell_extras = [], [], []
    for a, label in zip(starts.tolist(), row_labels.tolist()):  # per row
        cell_labels += [label] + list(digits)
        sources += [a] * cols
        cell_extras += [{"kind": "original"}] + [{"kind": "class"}] * n_classes
    write_sheet(classes_path, grid.reshape(-1, N_PIXELS), cell_labels, cols, sources=sources,
                cell_extras=cell_extras,
                extra={"what": "z fixed per row (mu of the test digit in the first column, its "
                               "source) decoded as every trained digit", "pairs": pairs,
                       **common})
    return [os.fspath(path), os.fspath(classes_path)]


def classes_path_for(path):
    """`interpolate.pgm` -> `interpolate-classes.pgm`."""
    stem, suffix = os.path.splitext(os.fspath(path))
    return f"{stem}-classes{suffix}"
