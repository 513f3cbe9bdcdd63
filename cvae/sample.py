"""Image commands: `cvae reconstruct`, `cvae generate`, `cvae interpolate`, and the run's images.

Every sheet is a PGM with a JSON sidecar (cvae.images.write_sheet): each cell has x, y, label
and a "kind" (original, reconstruction, sample, interpolation, class, blank), and the
sidecar's "extra" records the checkpoint, seed and settings that produced it.

Encoding and decoding go through the kernels in batches of the model's max_batch; the only
Python loops are per batch, never per image.

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

import argparse
import math
import os
import time

import numpy as np

from cvae.data import NUM_DIGITS as N_CLASSES
from cvae.data import PIXELS_PER_IMAGE as N_PIXELS
from cvae.errors import CvaeError
from cvae.images import sidecar_path, to_uint8, write_sheet, write_sheets

DEFAULT_N = 64            # reconstruct: test digits (each shown beside its reconstruction)
RECON_PAIRS_PER_ROW = 8   # reconstruct: original|reconstruction pairs per row
DEFAULT_PER_DIGIT = 10
MAX_AUTO_COLS = 20        # generate: per-digit samples fill one row up to this many columns
DEFAULT_MAX_ROWS = 50
DEFAULT_STEPS = 10
DEFAULT_PAIRS = 5
DEFAULT_BATCH = 256       # rows per kernel call for the commands' model
FLOW_SAMPLES_NAME = "samples-flow.pgm"  # the run's digit sheet from its flow prior


# ---------------------------------------------------------------- batched model calls


def encode_mu(model, pixels, labels):
    """mu (n, latent) float32 for uint8 pixels (n, 784) and labels (n,), in model-sized batches."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    n = len(labels)
    mu = np.empty((n, model.arch.latent), dtype=np.float32)
    step = model.max_batch
    for start in range(0, n, step):
        stop = min(start + step, n)
        mu[start:stop], _ = model.encode(pixels[start:stop], labels[start:stop])
    return mu


def decode_images(model, z, labels):
    """uint8 images (n, 784) of the decoder's mean sigmoid(decoder(z, label)), in batches.

    Each batch is converted to bytes at once, so n float images never exist together.
    """
    z = np.ascontiguousarray(z, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    n = len(labels)
    if z.shape != (n, model.arch.latent):
        raise ValueError(f"z has shape {z.shape}, expected ({n}, {model.arch.latent})")
    out = np.empty((n, N_PIXELS), dtype=np.uint8)
    step = model.max_batch
    for start in range(0, n, step):
        stop = min(start + step, n)
        out[start:stop] = to_uint8(model.decode(z[start:stop], labels[start:stop]))
    return out


# ---------------------------------------------------------------- test digit selection


def pick_balanced(dataset, digits, n, rng):
    """Up to n dataset indices spread evenly over digits (round-robin over shuffled per-digit
    lists), ordered by label then index."""
    labels = np.asarray(dataset.labels)
    candidates = rng.permutation(dataset.rows_of(digits))
    if len(candidates) == 0:
        raise CvaeError(f"{dataset.name} has no images of digits {_digits_text(digits)}")
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
    recon = decode_images(model, encode_mu(model, pixels, labels), labels)
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


def sample_layout(digits, per_digit, cols):
    """Cell labels for `per_digit` samples of each digit, each digit starting a new row.

    Returns (labels (cells,) int array with -1 for blank padding cells, sample number within
    its digit (-1 for blanks)).
    """
    block = math.ceil(per_digit / cols) * cols
    position = np.arange(block)
    real = np.tile(position < per_digit, len(digits))
    labels = np.where(real, np.repeat(np.asarray(digits, dtype=np.int64), block), -1)
    number = np.where(real, np.tile(position, len(digits)), -1)
    return labels, number


def sample_sheets(model, digits, path, per_digit=DEFAULT_PER_DIGIT, temperature=1.0, seed=0,
                  cols=None, max_rows=DEFAULT_MAX_ROWS, extra=None, prior=None):
    """Class-conditional samples of `prior` (cvae.prior: GaussianPrior, z ~ N(0, T² I), by
    default, or FlowSampler) from numpy default_rng(seed) draws in cell order, decoded with
    their digit's label; one row per digit when per_digit <= cols.

    cols defaults to min(per_digit, MAX_AUTO_COLS). Every digit starts on a new row; a digit's
    unfilled last row is padded with blank cells (black, label null, kind "blank"). More than
    max_rows rows are split into numbered sheets (NAME-0001.pgm, ...).
    Returns (paths, digits generated, seconds spent sampling and decoding).
    """
    cols = cols or min(per_digit, MAX_AUTO_COLS)
    labels, number = sample_layout(digits, per_digit, cols)
    real = labels >= 0
    n = int(real.sum())
    start = time.perf_counter()
    if prior is None:
        from cvae.prior import GaussianPrior

        prior = GaussianPrior(model.arch.latent)
    z = prior.draw(labels[real], np.random.default_rng(seed), temperature)
    decoded = decode_images(model, z, labels[real])
    seconds = time.perf_counter() - start
    if n == len(labels):
        images = decoded
    else:
        images = np.zeros((len(labels), N_PIXELS), dtype=np.uint8)
        images[real] = decoded
    cell_labels = [None if label < 0 else label for label in labels.tolist()]
    cell_extras = [{"kind": "blank"} if k < 0 else {"kind": "sample", "sample": k}
                   for k in number.tolist()]
    paths = write_sheets(path, images, cell_labels, cols, max_rows, cell_extras=cell_extras,
                         extra={"what": f"class-conditional samples of the {prior.name} prior "
                                        "at the temperature, one digit per row block",
                                "temperature": temperature, "seed": seed, "digits": list(digits),
                                "per_digit": per_digit, **prior.describe(), **(extra or {})})
    return paths, n, seconds


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
    mu = encode_mu(model, np.concatenate([start_pixels, ends_pixels]),
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


#: A file older than the one it was made from by more than this is stale (the slack lets a
#: run directory copied without preserved times, files in any order, still count as fresh).
STALE_SECONDS = 2.0


def flow_sheet_problem(run_dir):
    """None when the run has its flow prior's digit sheet, as new as its prior.cvae; else
    why not."""
    from cvae.prior import PRIOR_NAME, prior_path

    sheet = os.path.join(os.fspath(run_dir), FLOW_SAMPLES_NAME)
    try:
        if os.path.getmtime(sheet) + STALE_SECONDS < os.path.getmtime(prior_path(run_dir)):
            return f"{FLOW_SAMPLES_NAME} is older than {PRIOR_NAME}"
    except FileNotFoundError:
        if not os.path.isfile(sheet):
            return f"no {FLOW_SAMPLES_NAME}"
    return None


def write_flow_samples(model, run_dir, seed, digits, flow, directory=None):
    """The run's flow-prior digit sheet, directory/samples-flow.pgm (default: in run_dir),
    drawn like samples.pgm (10 per digit at T = 1, the run's seed); returns its paths."""
    path = os.path.join(directory or os.fspath(run_dir), FLOW_SAMPLES_NAME)
    paths, _, _ = sample_sheets(model, tuple(int(d) for d in digits), path, per_digit=10,
                                temperature=1.0, seed=seed, cols=10,
                                extra={"run_dir": os.path.abspath(run_dir)}, prior=flow)
    return paths


def classes_path_for(path):
    """`interpolate.pgm` -> `interpolate-classes.pgm`."""
    stem, suffix = os.path.splitext(os.fspath(path))
    return f"{stem}-classes{suffix}"


def write_run_images(model, test_dataset, run_dir, seed, digits, flow=None):
    """The trainer's end-of-run images in run_dir: reconstructions.pgm, samples.pgm (one row of
    10 per digit, temperature 1, N(0, I)), with a flow prior sampler samples-flow.pgm (the
    same draws carried by the flow), interpolations.pgm and interpolations-classes.pgm, each
    with its sidecar. Returns the PGM paths."""
    run_dir = os.fspath(run_dir)
    digits = tuple(int(d) for d in digits)
    extra = {"run_dir": os.path.abspath(run_dir)}
    paths, _ = reconstruction_sheet(model, test_dataset, digits,
                                    os.path.join(run_dir, "reconstructions.pgm"), seed=seed,
                                    extra=extra)
    samples, _, _ = sample_sheets(model, digits, os.path.join(run_dir, "samples.pgm"),
                                  per_digit=10, temperature=1.0, seed=seed, cols=10,
                                  extra=extra)
    paths += samples
    if flow is not None:
        paths += write_flow_samples(model, run_dir, seed, digits, flow)
    interp = os.path.join(run_dir, "interpolations.pgm")
    paths += interpolation_sheets(model, test_dataset, digits, interp, classes_path_for(interp),
                                  pairs=max(DEFAULT_PAIRS, len(digits)), seed=seed, extra=extra)
    return paths


# ---------------------------------------------------------------- command plumbing


def _digits_text(digits):
    return ",".join(str(d) for d in digits)


def resolve_checkpoint(arg):
    """(checkpoint path, run directory) for a .cvae file or a run directory (its latest)."""
    from cvae.checkpoint import latest_checkpoint

    path = os.fspath(arg)
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CvaeError(f"run directory {path} holds no checkpoint (last.cvae or epoch-NNNN.cvae)")
        return found, path
    if not os.path.exists(path):
        raise CvaeError(f"checkpoint {path} does not exist")
    return path, os.path.dirname(os.path.abspath(path))


def checkpoint_digits(meta, source):
    """The digits a checkpoint was trained on, from meta["digits"]."""
    digits = meta.get("digits")
    ok = (isinstance(digits, list) and digits
          and all(type(d) is int and 0 <= d < N_CLASSES for d in digits))
    if not ok:
        raise CvaeError(f"{source}: its header does not say which digits it was trained on")
    return tuple(sorted(set(digits)))


def check_digits(wanted, trained, source):
    missing = [d for d in wanted if d not in trained]
    if missing:
        raise CvaeError(f"{source} was trained on digits {_digits_text(trained)} only, not "
                        f"{_digits_text(missing)}: a class it never saw decodes to noise")


def output_path(out, run_dir, default_name):
    """--out, else RUN/default_name; must end in .pgm and its directory must be writable."""
    path = os.fspath(out) if out else os.path.join(run_dir, default_name)
    from cvae.atomic import check_writable

    sidecar_path(path)  # rejects names not ending in .pgm
    return check_writable(path)


def _positive(value, option):
    if value is None or value <= 0:
        raise CvaeError(f"{option} must be a positive integer, got {value}")
    return value


def resolve_seed(seed):
    if seed < 0:
        raise CvaeError(f"--seed must be a non-negative integer, got {seed}")
    return seed


def _threads(args):
    threads = getattr(args, "threads", None)
    if threads is None:
        from cvae.kernels import default_threads

        return default_threads()
    return _positive(threads, "--threads")


def open_model(path, args, batch=DEFAULT_BATCH):
    from cvae.model import model_from_checkpoint

    model, meta = model_from_checkpoint(path, threads=_threads(args), max_batch=batch)
    return model, meta


def load_test(args, trained):
    from cvae.data import Dataset, has_mnist_files
    from cvae.fetch import resolve_data_dir

    data_dir, source = resolve_data_dir(args.data)
    if source == "cache" and not has_mnist_files(data_dir, splits=("test",)):
        raise CvaeError(f"MNIST test data is not in the cache {data_dir}: run 'cvae data fetch' "
                        f"first, or give --data DIR")
    dataset = Dataset.load(data_dir, "test")  # every row, so sources are test-file indices
    absent = [d for d in trained if d not in dataset.digits]
    if absent:
        raise CvaeError(f"{dataset.name} has no images of digit {_digits_text(absent)}")
    return dataset


def cmd_reconstruct(args):
    n = _positive(args.n, "--n")
    seed = resolve_seed(args.seed)
    _threads(args)
    path, run_dir = resolve_checkpoint(args.checkpoint)
    out = output_path(args.out, run_dir, "reconstruct.pgm")
    model, meta = open_model(path, args)
    digits = checkpoint_digits(meta, path)
    dataset = load_test(args, digits)
    paths, k = reconstruction_sheet(model, dataset, digits, out, n=n, seed=seed,
                                    extra={"checkpoint": os.path.abspath(path)})
    note = f" (only {k} test images of digits {_digits_text(digits)})" if k < n else ""
    print(f"{k} test digits and their reconstructions{note} -> {paths[0]}")
    return 0


def cmd_generate(args):
    per_digit = _positive(args.per_digit, "--per-digit")
    temperature = args.temperature
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise CvaeError(f"--temperature must be a finite number >= 0, got {temperature}")
    if args.cols is not None:
        _positive(args.cols, "--cols")
    max_rows = _positive(args.max_rows, "--max-rows")
    seed = resolve_seed(args.seed)
    _threads(args)
    path, run_dir = resolve_checkpoint(args.checkpoint)
    out = output_path(args.out, run_dir, "generate.pgm")
    model, meta = open_model(path, args)
    from cvae.prior import open_prior, sampling_text

    prior = open_prior(args.prior, run_dir, model, model.threads, args.ode_steps, args.method,
                       args.guidance)
    trained = checkpoint_digits(meta, path)
    digits = trained
    if args.digits is not None:
        from cvae.data import parse_digits

        digits = parse_digits(args.digits) if isinstance(args.digits, str) else tuple(args.digits)
        check_digits(digits, trained, path)
    start = time.perf_counter()
    paths, n, seconds = sample_sheets(model, digits, out, per_digit=per_digit,
                                      temperature=temperature, seed=seed, cols=args.cols,
                                      max_rows=max_rows,
                                      extra={"checkpoint": os.path.abspath(path)}, prior=prior)
    total = time.perf_counter() - start
    rate = n / seconds if seconds > 0 else float("inf")
    where = paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
    how = (f"flow prior: {sampling_text(prior.describe())}" if prior.name == "flow"
           else "N(0, I) prior")
    print(f"generated {n} digits in {seconds:.3f} s ({rate:,.0f} digits/s, {model.threads} threads, "
          f"{how}, seed {seed}, temperature {temperature:g}); {len(paths)} sheet(s) in "
          f"{total:.3f} s -> {where}")
    return 0


def cmd_interpolate(args):
    steps = _positive(args.steps, "--steps")
    if steps < 2:
        raise CvaeError(f"--steps must be at least 2 (the two endpoints), got {steps}")
    pairs = _positive(args.pairs, "--pairs")
    seed = resolve_seed(args.seed)
    _threads(args)
    path, run_dir = resolve_checkpoint(args.checkpoint)
    out = output_path(args.out, run_dir, "interpolate.pgm")
    classes_out = classes_path_for(out)
    model, meta = open_model(path, args)
    digits = checkpoint_digits(meta, path)
    dataset = load_test(args, digits)
    paths = interpolation_sheets(model, dataset, digits, out, classes_out, steps=steps,
                                 pairs=pairs, seed=seed,
                                 extra={"checkpoint": os.path.abspath(path)})
    print(f"{pairs} interpolation(s) of {steps} steps -> {paths[0]}; "
          f"the same z across digits {_digits_text(digits)} -> {paths[1]}")
    return 0


# ---------------------------------------------------------------- parsers


def _common(p, data=False):
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a .cvae checkpoint, or a run directory (its last.cvae, else its latest "
                        "epoch-NNNN.cvae)")
    if data:
        p.add_argument("--data", metavar="DIR", default=None,
                       help="MNIST directory with the test files (default: $CVAE_DATA, else the cache)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed; the same seed gives the same sheet (default: 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="OpenMP threads (default: the CPUs available to this process)")


def register(subparsers):
    from cvae.prior import add_prior_options

    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "reconstruct", formatter_class=fmt,
        help="test digits beside their reconstructions",
        description="Encode test digits of the checkpoint's trained digits (spread evenly over the "
                    "digits, chosen by --seed) and\ndecode them at z = mu. The sheet shows pairs of "
                    "columns original|reconstruction, 8 pairs per row;\nthe sidecar JSON gives each "
                    "cell's label, source (test-file index) and kind.")
    _common(p, data=True)
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help=f"test digits to show (default: {DEFAULT_N})")
    p.add_argument("--out", metavar="FILE.pgm", default=None,
                   help="output sheet; its sidecar is FILE.json (default: RUN/reconstruct.pgm)")
    p.set_defaults(func=cmd_reconstruct)

    p = subparsers.add_parser(
        "generate", formatter_class=fmt,
        help="class-conditional samples from the prior",
        description="Decode a draw of the prior with each requested digit's label: the run's flow prior\n"
                    "(prior.cvae, see 'cvae prior train') when it has one, else z ~ N(0, T^2 I); the flow\n"
                    "carries the same N(0, T^2 I) draws (numpy default_rng(seed)) to its codes.\n"
                    "One row per digit while --per-digit fits a row (up to 20 columns, or --cols);\n"
                    "each digit starts a new row, blank cells pad a digit's last row, and sheets of more\n"
                    "than --max-rows rows are split into FILE-0001.pgm, FILE-0002.pgm, ...\n"
                    "Prints how many digits were generated per second.")
    _common(p)
    p.add_argument("--digits", default=None, metavar="LIST",
                   help="digits to generate, e.g. 0-9, 3 or 0-4,7; must be among the checkpoint's "
                        "trained digits (default: all of them)")
    p.add_argument("--per-digit", type=int, default=DEFAULT_PER_DIGIT, metavar="N",
                   help=f"samples per digit (default: {DEFAULT_PER_DIGIT})")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="standard deviation of the draws z0 ~ N(0, T² I) (the flow prior carries "
                        "them on; with N(0, I), 0 decodes z = 0, the same image for every sample "
                        "of a digit) (default: 1.0)")
    p.add_argument("--cols", type=int, default=None,
                   help=f"columns per row (default: --per-digit, at most {MAX_AUTO_COLS})")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, metavar="R",
                   help=f"rows per sheet before splitting into numbered sheets (default: {DEFAULT_MAX_ROWS})")
    p.add_argument("--out", metavar="FILE.pgm", default=None,
                   help="output sheet; its sidecar is FILE.json (default: RUN/generate.pgm)")
    add_prior_options(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "interpolate", formatter_class=fmt,
        help="walks in latent space between test digits, and one z across all digits",
        description="Sheet 1 (FILE.pgm): per row, two random test images of the same digit (row r\n"
                    "uses the r-th trained digit, cycling), encoded to mu; the straight line between\n"
                    "them is decoded with that label at --steps points (endpoints included), framed by\n"
                    "the two originals. Keeping the label fixed shows style varying within a class.\n"
                    "Sheet 2 (FILE-classes.pgm): per row, z = mu of the row's first test image decoded\n"
                    "as every trained digit: the same style across classes.")
    _common(p, data=True)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"points along each path, endpoints included (default: {DEFAULT_STEPS})")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                   help=f"rows (pairs of test digits) (default: {DEFAULT_PAIRS})")
    p.add_argument("--out", metavar="FILE.pgm", default=None,
                   help="first sheet; the second is FILE-classes.pgm (default: RUN/interpolate.pgm)")
    p.set_defaults(func=cmd_interpolate)
