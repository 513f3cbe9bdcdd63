"""`cvae generate`, `cvae reconstruct`, `cvae interpolate`: digit sheets from a checkpoint."""

import os
import sys

from cvae.cli.options import (add_checkpoint, add_data, add_parser, add_precision,
                              add_prior_options, add_threads, digits_type, non_negative_float, non_negative_int,
                              number_type, positive_int)
from cvae.data import digits_text
from cvae.kernels import sleep_when_waiting
from cvae.prior import sampling_text
from cvae.shard import parse_shard
from cvae.sheets import (DEFAULT_MAX_ROWS, DEFAULT_N, DEFAULT_PAIRS, DEFAULT_PER_DIGIT,
                         DEFAULT_STEPS, MAX_AUTO_COLS)
from cvae.workflows import generate, interpolate, reconstruct

at_least_two = number_type(int, "an integer", lambda v: v >= 2,
                           "at least 2 (the two endpoints)")


def cmd_reconstruct(args):
    done = reconstruct(args.checkpoint, out=args.out, n=args.n, seed=args.seed,
                       threads=args.threads, data=args.data)
    note = (f" (only {done.count} test images of digits {digits_text(done.digits)})"
            if done.count < args.n else "")
    print(f"{done.count} test digits and their reconstructions{note} -> {done.paths[0]}")
    return 0


def cmd_generate(args):
    sleep_when_waiting()  # before anything loads the kernels
    shard = parse_shard(args.shard, os.environ)
    idx = args.format == "idx"
    done = generate(args.checkpoint, out=args.out, digits=args.digits,
                    per_digit=args.per_digit, temperature=args.temperature, cols=args.cols,
                    max_rows=args.max_rows, seed=args.seed, threads=args.threads,
                    prior=args.prior, steps=args.ode_steps, method=args.method,
                    guidance=args.guidance, shard=shard, idx=idx, split=args.split,
                    progress=shard_progress(shard, "rows" if idx else "sheets"),
                    precision=args.precision)
    rate = done.count / done.seconds if done.seconds > 0 else float("inf")
    paths = done.paths
    if idx:
        what = f"{'part' if shard else 'data set'} {', '.join(os.path.basename(p) for p in paths)}"
        where = f"{what} in {os.path.dirname(paths[0])}"
    else:
        where = ("no sheet (more shards than sheets)" if not paths else paths[0]
                 if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}")
        where = f"{len(paths)} sheet(s) in {done.total_seconds:.3f} s -> {where}"
    prior = done.prior
    how = (f"flow prior: {sampling_text(prior.describe())}" if prior.name == "flow"
           else "N(0, I) prior")
    who = f"shard {shard}: " if shard else ""
    print(f"{who}generated {done.count} digits in {done.seconds:.3f} s ({rate:,.0f} digits/s, "
          f"{done.threads} threads, {done.precision}, {how}, seed {args.seed}, temperature "
          f"{args.temperature:g}); {where}")
    return 0


def shard_progress(shard, unit):
    """For a shard (a job on a cluster, whose log is all one sees of it): a callback printing
    `cvae: shard K/N: UNIT done/total` on stderr per tenth of its work. None otherwise: an
    unsharded generate prints only its final line."""
    if shard is None:
        return None
    last = [-1]

    def report(done, total):
        tenth = 10 * done // max(total, 1)
        if tenth > last[0]:
            last[0] = tenth
            print(f"cvae: shard {shard}: {unit} {done:,}/{total:,}", file=sys.stderr, flush=True)

    return report


def cmd_interpolate(args):
    done = interpolate(args.checkpoint, out=args.out, steps=args.steps, pairs=args.pairs,
                       seed=args.seed, threads=args.threads, data=args.data)
    print(f"{args.pairs} interpolation(s) of {args.steps} steps -> {done.paths[0]}; "
          f"the same z across digits {digits_text(done.digits)} -> {done.paths[1]}")
    return 0


def _common(p, data=False):
    add_checkpoint(p)
    if data:
        add_data(p)
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                   help="random seed; the same seed gives the same sheet (default: 0)")
    add_threads(p)


def register(subparsers):
    p = add_parser(
        subparsers, "reconstruct", help="test digits beside their reconstructions",
        description="Encode test digits of the checkpoint's trained digits (spread evenly over the "
                    "digits, chosen by --seed) and\ndecode them at z = mu. The sheet shows pairs of "
                    "columns original|reconstruction, 8 pairs per row;\nthe sidecar JSON gives each "
                    "cell's label, source (test-file index) and kind.")
    _common(p, data=True)
    p.add_argument("--n", type=positive_int, default=DEFAULT_N,
                   help=f"test digits to show (default: {DEFAULT_N})")
    p.add_argument("--out", metavar="FILE.pgm", default=None,
                   help="output sheet; its sidecar is FILE.json (default: RUN/reconstruct.pgm)")
    p.set_defaults(func=cmd_reconstruct)

    p = add_parser(
        subparsers, "generate", help="class-conditional samples from the prior",
        description="Decode a draw of the prior with each requested digit's label: the run's flow prior\n"
                    "(prior.cvae, see 'cvae prior train') when it has one, else z ~ N(0, T^2 I); the flow\n"
                    "carries the same N(0, T^2 I) draws (numpy default_rng(seed); from the 65,537th digit on,\n"
                    "its child streams, keyed by each digit's place) to its codes.\n"
                    "One row per digit while --per-digit fits a row (up to 20 columns, or --cols);\n"
                    "each digit starts a new row, blank cells pad a digit's last row, and sheets of more\n"
                    "than --max-rows rows are split into FILE-0001.pgm, FILE-0002.pgm, ...\n"
                    "Prints how many digits were generated per second.")
    _common(p)
    p.add_argument("--digits", type=digits_type, default=None, metavar="LIST",
                   help="digits to generate, e.g. 0-9, 3 or 0-4,7; must be among the checkpoint's "
                        "trained digits (default: all of them)")
    p.add_argument("--per-digit", type=positive_int, default=DEFAULT_PER_DIGIT, metavar="N",
                   help=f"samples per digit (default: {DEFAULT_PER_DIGIT})")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, metavar="T",
                   help="standard deviation of the draws z0 ~ N(0, T² I) (the flow prior carries "
                        "them on; with N(0, I), 0 decodes z = 0, the same image for every sample "
                        "of a digit) (default: 1.0)")
    p.add_argument("--cols", type=positive_int, default=None,
                   help=f"columns per row (default: --per-digit, at most {MAX_AUTO_COLS})")
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, metavar="R",
                   help=f"rows per sheet before splitting into numbered sheets (default: "
                        f"{DEFAULT_MAX_ROWS})")
    p.add_argument("--out", metavar="FILE.pgm|DIR", default=None,
                   help="output sheet; its sidecar is FILE.json (default: RUN/generate.pgm); "
                        "with --format idx, the data set's directory")
    p.add_argument("--format", choices=("pgm", "idx"), default="pgm",
                   help="pgm: digit sheets; idx: an MNIST-format data set in --out DIR, "
                        "DIR/train-images-idx3-ubyte and DIR/train-labels-idx1-ubyte (the same "
                        "digits without blank cells, all of each digit in turn) and "
                        "DIR/train-generated.json saying what made them (default: pgm)")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="with --format idx: write the train-* files, or the t10k-* files that "
                        "training also reads (use another --seed for them) (default: train)")
    p.add_argument("--shard", metavar="K/N|slurm", default=None,
                   help="generate only shard K of N (1-based): its whole sheets, or with "
                        "--format idx its rows as DIR/parts/train-KKKK-of-NNNN-* for 'cvae data "
                        "merge DIR'; every digit's draws depend on its place in the whole "
                        "generation, so all N shards write what one run writes. 'slurm': K and "
                        "N from the job array (SLURM_ARRAY_TASK_ID, _MIN, _STEP, _COUNT)")
    add_prior_options(p)
    add_precision(p, None, "the decoder's and the flow prior's GEMMs (default: the one the "
                           "run was trained in, so its own sheets come out the same)")
    p.set_defaults(func=cmd_generate)

    p = add_parser(
        subparsers, "interpolate",
        help="walks in latent space between test digits, and one z across all digits",
        description="Sheet 1 (FILE.pgm): per row, two random test images of the same digit (row r\n"
                    "uses the r-th trained digit, cycling), encoded to mu; the straight line between\n"
                    "them is decoded with that label at --steps points (endpoints included), framed by\n"
                    "the two originals. Keeping the label fixed shows style varying within a class.\n"
                    "Sheet 2 (FILE-classes.pgm): per row, z = mu of the row's first test image decoded\n"
                    "as every trained digit: the same style across classes.")
    _common(p, data=True)
    p.add_argument("--steps", type=at_least_two, default=DEFAULT_STEPS,
                   help=f"points along each path, endpoints included (default: {DEFAULT_STEPS})")
    p.add_argument("--pairs", type=positive_int, default=DEFAULT_PAIRS,
                   help=f"rows (pairs of test digits) (default: {DEFAULT_PAIRS})")
    p.add_argument("--out", metavar="FILE.pgm", default=None,
                   help="first sheet; the second is FILE-classes.pgm (default: RUN/interpolate.pgm)")
    p.set_defaults(func=cmd_interpolate)
