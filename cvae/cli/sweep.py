"""`cvae sweep`: train and evaluate every combination of a few settings, one table; or
`--collect` the table of runs made by separate jobs, or print those jobs (`--commands`)."""

import json
import sys

from cvae.cli.options import (add_parser, add_precision, choice_item, digits_type, hidden_item, latent_item,
                              list_type, mode, non_negative_float, non_negative_int,
                              positive_float, positive_int, say)
from cvae.errors import CvaeError
from cvae.model import ACTIVATIONS, VARIANTS
from cvae.prior import DEFAULT_EPOCHS
from cvae.schedule import SCHEDULES
from cvae.sweep import (EVAL_DEFAULTS, GRID, PRIORS, Sweep, check_sweep, collect_table,
                        commands, run_sweep)


def sweep_from_args(args):
    fields = GRID + ("digits", "epochs", "batch", "lr", "seed", "threads", "data",
                     "precision", "k", "samples", "temperature", "classifier", "prior",
                     "prior_epochs")
    return Sweep(out=args.out, mode=mode(args), argv=list(args.argv),
                 **{name: getattr(args, name) for name in fields})


def cmd_sweep(args):
    sweep = sweep_from_args(args)
    given = sweep.given() + (["commands"] if args.commands else [])
    if args.collect is not None:
        if args.out is not None:
            raise CvaeError("--collect DIR writes its table into DIR: leave out --out")
        if given:
            raise CvaeError(f"--collect builds the table from finished runs and takes no "
                            f"training options (got --{given[0].replace('_', '-')})")
        return cmd_collect(args)
    if args.commands:
        for line in commands(sweep, check_sweep(sweep)):
            print(line)
        return 0
    code, paths, rows = run_sweep(sweep, say(args), print_row if args.json else None)
    if code:
        return code
    jsonl, md = paths
    runs = len(check_sweep(sweep))
    table = "" if rows == runs else f", {rows} rows"
    say(args)(f"table of {runs} run(s){table} -> {md}, {jsonl}")
    return 0


def print_row(row, status):
    print(json.dumps({**row, "status": status}), flush=True)


def cmd_collect(args):
    rows, unfinished, notes, jsonl, md = collect_table(args.collect)
    for note in notes:
        print(f"cvae: note: {note}", file=sys.stderr, flush=True)
    for run_dir, why in unfinished:
        print(f"cvae: {run_dir}: unfinished ({why}): not in the table", file=sys.stderr,
              flush=True)
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
    elif not args.quiet:
        runs = len({r["name"] for r in rows})
        each = "" if runs == len(rows) else f" ({len(rows)} rows: one per run and prior)"
        print(f"{runs} finished run(s){each} -> {md}, {jsonl}", flush=True)
    return 0


def register(subparsers):
    p = add_parser(
        subparsers, "sweep",
        help="train every combination of latent/hidden/act/schedule, evaluate each, one table",
        description=(
            "Train every combination of the grid options (each a comma-separated list), evaluate\n"
            "each run (as 'cvae eval') and write one table: DIR/sweep.md (Markdown, best negative\n"
            "ELBO in bold, each column defined) and DIR/sweep.jsonl (one JSON object per row).\n"
            "Every run is DIR/<name>, e.g. DIR/latent128-h640x320-elu-progressive, a normal run\n"
            "directory (config.json, metrics.jsonl, checkpoints, eval.json, samples.pgm, ...).\n\n"
            "--prior gaussian,flow also trains each run's flow prior (as 'cvae prior train') and\n"
            "judges the digits of each prior: one table row per run and prior.\n\n"
            "Running the same command again skips finished runs (complete, with an eval.json of\n"
            "the final checkpoint, and the flow prior when asked) and resumes partial ones;\n"
            "Ctrl-C / SIGTERM stop the sweep at once (exit 130 / 143) after the trainer saves a\n"
            "checkpoint.\n\n"
            "For a sweep of independent jobs (Slurm array, GNU parallel): --commands prints one\n"
            "shell line per run (cvae train ... && [cvae prior train ... &&] cvae eval ... --json);\n"
            "when they are done, 'cvae sweep --collect DIR' builds the table from every finished\n"
            "run under DIR."),
        epilog="example: cvae sweep --latent 128,256 --act elu,relu --epochs 30 --out runs/latent")
    grid = p.add_argument_group("grid (each a comma-separated list; every combination is one run)")
    grid.add_argument("--variant", type=list_type(choice_item(tuple(VARIANTS), "a variant"),
                                                   "full,conv"),
                      metavar="V1,V2", default=None,
                      help="models, each with its sizes and digits, which the other grid options "
                           "override (default: full)")
    grid.add_argument("--latent", type=list_type(latent_item, "128,256"), metavar="L1,L2,...",
                      default=None, help="latent sizes (default: the variant's)")
    grid.add_argument("--hidden", type=list_type(hidden_item, "640x320,512x256"),
                      metavar="H1xH2,...", default=None,
                      help="hidden layer sizes, each pair written H1xH2, pairs separated by commas, "
                           "e.g. 640x320,512x256; conv's single size H, e.g. 512,1024 (default: "
                           "the variant's)")
    grid.add_argument("--act", type=list_type(choice_item(ACTIVATIONS, "an activation"), "elu,relu"),
                      metavar="A1,A2", default=None,
                      help=f"hidden activations, of {','.join(ACTIVATIONS)} (default: elu)")
    grid.add_argument("--schedule", type=list_type(choice_item(tuple(SCHEDULES), "a schedule"),
                                                    "progressive,constant"),
                      metavar="S1,S2", default=None,
                      help=f"β / learning-rate schedules, of {','.join(SCHEDULES)} (see 'cvae train "
                           f"--help') (default: progressive)")
    shared = p.add_argument_group("shared by every run (as in 'cvae train')")
    shared.add_argument("--digits", type=digits_type, default=None,
                        help="digits to train on, e.g. 0-9 or 0,1 (default: the variant's)")
    shared.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default: 30)")
    shared.add_argument("--batch", type=positive_int, default=None, help="minibatch size (default: 64)")
    shared.add_argument("--lr", type=positive_float, default=None, help="base learning rate (default: 1e-3)")
    shared.add_argument("--seed", type=non_negative_int, default=None,
                        help="training seed, also the evaluation's noise seed (default: 0)")
    shared.add_argument("--threads", type=positive_int, default=None,
                        help="OpenMP threads (default: the CPUs available to this process)")
    add_precision(shared, None, "each run's training (as 'cvae train --precision'; default: "
                                "cvae train's)")
    shared.add_argument("--data", metavar="DIR", default=None,
                        help="MNIST directory (default: $CVAE_DATA, else the cache, fetched when empty)")
    def eval_default(name):
        return f"(default: cvae eval's, {EVAL_DEFAULTS[name]:g})"

    ev = p.add_argument_group("evaluation (as in 'cvae eval'; its defaults unless given)")
    ev.add_argument("--k", type=positive_int, default=None,
                    help=f"importance samples per image of the IWAE bound {eval_default('k')}")
    ev.add_argument("--samples", type=positive_int, default=None,
                    help=f"generated digits per digit for the conditional accuracy and FID "
                         f"{eval_default('samples')}")
    ev.add_argument("--temperature", type=non_negative_float, default=None,
                    help=f"temperature of those generated digits {eval_default('temperature')}")
    ev.add_argument("--classifier", metavar="FILE", default=None,
                    help="digit classifier for the conditional accuracy and FID (default: cvae "
                         "eval's: the shipped one, for the MNIST test set)")
    pr = p.add_argument_group("prior (of the generated digits that cond. acc., FID and diversity judge)")
    pr.add_argument("--prior", type=list_type(choice_item(PRIORS, "a prior"), "gaussian,flow"),
                    metavar="P1,P2", default=None,
                    help="priors, each one row per run in the table: gaussian (z ~ N(0, T² I), "
                         "the CVAE's own) and flow (the run's flow-matching prior, trained after "
                         "the CVAE as 'cvae prior train' trains it; its digit sheet is "
                         "samples-flow.pgm). The CVAE is trained once either way (default: "
                         "gaussian)")
    pr.add_argument("--prior-epochs", type=positive_int, default=None, metavar="N",
                    help=f"epochs of each run's flow prior (default: cvae prior train's, "
                         f"{DEFAULT_EPOCHS})")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default=None,
                     help="sweep directory: one run directory per combination, and the table")
    out.add_argument("--collect", metavar="DIR", default=None,
                     help="only build DIR/sweep.md and DIR/sweep.jsonl from the finished runs under "
                          "DIR (takes no training options)")
    out.add_argument("--commands", action="store_true",
                     help="print one shell line per run (train or resume, then with flow in "
                          "--prior its prior train or resume, then eval) and train nothing: for "
                          "Slurm arrays or GNU parallel")
    quiet = out.add_mutually_exclusive_group()
    quiet.add_argument("--quiet", action="store_true", help="print nothing but errors")
    quiet.add_argument("--json", action="store_true",
                       help="one JSON object per table row on stdout (a run's row per prior, "
                            "with the run's 'status'); progress lines on stderr")
    p.set_defaults(func=cmd_sweep)
