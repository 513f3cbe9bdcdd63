"""The `cvae` command: train, info, data (fetch/verify), plus the sample and bench commands.

User errors (CvaeError, bad arguments) print one line, `cvae: error: ...`, and exit 2;
Ctrl-C exits 130. Tracebacks are for bugs only.
"""

import argparse
import json
import math
import os
import sys
import time

# numpy's OpenBLAS reads this when it loads (threadpoolctl only reaches libraries already
# loaded), so OpenMP (--threads) is the only pool that runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cvae
from cvae.errors import CvaeError
from cvae.kernels import default_threads

DEFAULT_VARIANT = "full"


class UsageError(CvaeError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`cvae: error: ...`, exit 2) instead of usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Raw descriptions; every option's help ends with its default unless it names one already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


# ---------------------------------------------------------------- argument types


def _number_type(convert, noun, accept, rule):
    """An argparse type: convert the text, then check it; both failures are one-line errors."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


positive_int = _number_type(int, "an integer", lambda v: v > 0, "a positive integer")
non_negative_int = _number_type(int, "an integer", lambda v: v >= 0, "a non-negative integer")
positive_float = _number_type(float, "a number", lambda v: math.isfinite(v) and v > 0,
                              "a positive number")
non_negative_float = _number_type(float, "a number", lambda v: math.isfinite(v) and v >= 0,
                                  "a non-negative number")
probability = _number_type(float, "a number", lambda v: 0 <= v < 1, "at least 0 and below 1")


def hidden_sizes(text):
    parts = text.split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two sizes like 640,320") from None
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two positive sizes like 640,320")
    return sizes


def digits_type(text):
    from cvae.data import parse_digits

    try:
        return parse_digits(text)
    except CvaeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------- architecture options


def add_arch_options(p, variant_default=DEFAULT_VARIANT):
    from cvae.model import ACTIVATIONS, VARIANTS

    sizes = "; ".join(f"{name}: {v['h1']},{v['h2']} latent {v['latent']}" for name, v in VARIANTS.items())
    p.add_argument("--variant", choices=tuple(VARIANTS), default=variant_default,
                   help=f"model size ({sizes})" + ("" if variant_default else " (default: full)"))
    p.add_argument("--hidden", type=hidden_sizes, metavar="H1,H2",
                   help="hidden layer sizes, overriding the variant's")
    p.add_argument("--latent", type=positive_int, metavar="L", help="latent size, overriding the variant's")
    p.add_argument("--act", choices=ACTIVATIONS, default=None, help="hidden activation (default: elu)")


def arch_from_args(args):
    from cvae.model import Arch

    base = Arch.variant(args.variant, act=args.act or "elu")
    h1, h2 = args.hidden if args.hidden else (base.h1, base.h2)
    return Arch(h1=h1, h2=h2, latent=args.latent or base.latent, act=base.act)


# ---------------------------------------------------------------- info


def cmd_info(args):
    from cvae.model import Model

    arch = arch_from_args(args)
    model = Model(arch, max_batch=args.batch, threads=args.threads)
    groups = model.slab_report()
    mb = {k: v * 4 / 1e6 for k, v in groups.items()}
    total = sum(mb.values())
    if args.json:
        print(json.dumps({"arch": arch.to_json(), "n_params": arch.n_params(), "batch": args.batch,
                          "threads": args.threads, "kernels": model.kernel_isa,
                          "slab_floats": groups, "slab_mb": mb, "total_mb": total}))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"architecture {arch.h1}-{arch.h2}-{arch.latent} {arch.act}: "
                  f"[bold]{arch.n_params():,}[/bold] parameters; slab for batch {args.batch}, "
                  f"{args.threads} threads (kernels {model.kernel_isa})")
    table = Table()
    table.add_column("section")
    table.add_column("floats", justify="right")
    table.add_column("MB", justify="right")
    for name, floats in groups.items():
        table.add_row(name, f"{floats:,}", f"{mb[name]:.3f}")
    table.add_row("[bold]total[/bold]", f"{sum(groups.values()):,}", f"[bold]{total:.3f}[/bold]")
    console.print(table)
    return 0


# ---------------------------------------------------------------- data


def cmd_data_fetch(args):
    from cvae.fetch import default_cache_dir, fetch_mnist

    cache = args.cache or default_cache_dir()
    fetch_mnist(cache, log=print)
    return 0


def cmd_data_verify(args):
    from cvae.fetch import resolve_data_dir, verify_mnist_dir

    data_dir, source = resolve_data_dir(args.data)
    if not os.path.isdir(data_dir):
        raise CvaeError(f"MNIST data directory {data_dir} (from {source}) does not exist")
    problems = verify_mnist_dir(data_dir)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        raise CvaeError(f"{data_dir}: {len(problems)} of 4 MNIST files missing or not matching "
                        f"the published checksums")
    print(f"{data_dir} (from {source}): the 4 MNIST files match the published checksums")
    return 0


# ---------------------------------------------------------------- train


# Options that fix the computation: with --resume they must match the run (or be left out).
# --prior is not one: the prior is trained after the CVAE, on its final parameters.
_RUN_OPTIONS = ("variant", "hidden", "latent", "act", "digits", "epochs", "batch", "lr", "seed",
                "schedule", "beta", "schedule_set")


def _say(args):
    if args.quiet:
        return lambda text: None
    stream = sys.stderr if args.json else sys.stdout
    return lambda text: print(text, file=stream, flush=True)


def ensure_data(args):
    """The data directory to train from; an empty cache is filled first (said in one line)."""
    from cvae.data import has_mnist_files
    from cvae.fetch import fetch_mnist, resolve_data_dir

    data_dir, source = resolve_data_dir(args.data)
    if source == "cache":
        if not has_mnist_files(data_dir):
            stream = sys.stderr if (args.json or args.quiet) else sys.stdout
            print(f"cvae: MNIST is not in the cache {data_dir}: fetching it first", file=stream, flush=True)
            fetch_mnist(data_dir, log=_say(args))
    return data_dir, source


def run_data_dir(args, run_dir):
    """The data directory for work on an existing run: --data, else $CVAE_DATA, else the one
    the run was started with (config.json), else the cache."""
    from cvae.train import recorded_data_dir

    if not args.data and not os.environ.get("CVAE_DATA"):
        args.data = recorded_data_dir(run_dir)
    return ensure_data(args)[0]


def make_reporter(args):
    from cvae.train import JsonReporter, Reporter, RichReporter

    if args.json:
        return JsonReporter()
    if args.quiet:
        return Reporter()
    return RichReporter()


def default_out(variant):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join("runs", f"{variant}-{stamp}")
    n = 1
    while os.path.exists(out):
        n += 1
        out = os.path.join("runs", f"{variant}-{stamp}-{n}")
    return out


def build_plan(args, train_set=None, test_set=None):
    from cvae.model import VARIANTS
    from cvae.schedule import make_schedule, parse_schedule_settings
    from cvae.train import Plan

    arch = arch_from_args(args)
    digits = args.digits or VARIANTS[args.variant]["digits"]
    settings = parse_schedule_settings(args.schedule_set)
    schedule_name = args.schedule or "progressive"
    if args.beta is not None:
        if schedule_name != "constant":
            raise CvaeError(f"--beta is for --schedule constant (the {schedule_name} schedule sets β itself)")
        settings["beta"] = args.beta
    lr = args.lr if args.lr is not None else 1e-3
    schedule = make_schedule(schedule_name, lr, **settings)
    return Plan(arch=arch, digits=tuple(digits), schedule=schedule,
                epochs=args.epochs if args.epochs is not None else 30,
                seed=args.seed if args.seed is not None else 0,
                batch=args.batch if args.batch is not None else 64,
                lr=lr, data={})


def check_resume_conflicts(args, plan, path):
    """Options given with --resume must agree with the run's configuration."""
    given = {name: getattr(args, name) for name in _RUN_OPTIONS if getattr(args, name) is not None}
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise CvaeError("--resume continues in the run's own directory: leave out --out")
    problems = []
    arch = plan.arch
    if "variant" in given or "hidden" in given or "latent" in given or "act" in given:
        from cvae.model import Arch, VARIANTS

        v = VARIANTS[given["variant"]] if "variant" in given else None
        h1, h2 = given.get("hidden") or ((v["h1"], v["h2"]) if v else (arch.h1, arch.h2))
        latent = given.get("latent") or (v["latent"] if v else arch.latent)
        wanted = Arch(h1=h1, h2=h2, latent=latent, act=given.get("act") or arch.act)
        if wanted != arch:
            problems.append(f"the architecture {h1}-{h2}-{latent} {wanted.act} (the run is "
                            f"{arch.h1}-{arch.h2}-{arch.latent} {arch.act})")
    checks = {"digits": tuple(plan.digits), "epochs": plan.epochs, "batch": plan.batch,
              "lr": plan.lr, "seed": plan.seed, "schedule": plan.schedule.name}
    for name, have in checks.items():
        if name in given and given[name] != have:
            problems.append(f"--{name} {given[name]!r} (the run has {have!r})")
    if "beta" in given and plan.schedule.params.get("beta") != given["beta"]:
        problems.append(f"--beta {given['beta']} (the run's schedule is {plan.schedule.describe()})")
    if "schedule_set" in given:
        from cvae.schedule import parse_schedule_settings

        for key, value in parse_schedule_settings(given["schedule_set"]).items():
            if plan.schedule.params.get(key) != value:
                problems.append(f"--schedule-set {key}={value:g} (the run's schedule is "
                                f"{plan.schedule.describe()})")
    if problems:
        raise CvaeError(f"--resume keeps the run's configuration ({path}), but these options "
                        f"differ: {'; '.join(problems)}")


def start_run(args, out, reporter, config_extra=None):
    """A fresh run in `out` (which must not hold one) from train options in args (build_plan's,
    data, threads, json, quiet, variant, argv): loads the data and writes config.json; returns
    the Trainer. `cvae train` and `cvae sweep` both start their runs here."""
    from cvae import train as T

    plan = build_plan(args)
    T.check_fresh_run_dir(out, create=False)  # before any data work: fail fast on a clobber
    data_dir, source = ensure_data(args)
    train_set, test_set = T.load_datasets(data_dir, plan.digits)
    plan.data = T.data_description(train_set, test_set)
    extra = {"variant": args.variant, "data_dir": os.path.abspath(data_dir), "data_source": source,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": args.argv, **(config_extra or {})}
    return T.new_trainer(out, plan, train_set, test_set, args.threads, reporter, config_extra=extra)


def cmd_train(args):
    from cvae import train as T

    if args.threads <= 0:
        raise CvaeError("--threads must be a positive integer")
    say = _say(args)
    reporter = make_reporter(args)
    if args.resume:
        model, plan, path = T.load_resume_point(args.resume, args.threads)
        check_resume_conflicts(args, plan, path)
        prior = args.prior or T.recorded_prior(args.resume)
        if args.prior is not None:
            T.record_prior(args.resume, args.prior)
        cvae_done = plan.epoch >= plan.epochs
        if cvae_done and (prior != "flow" or run_prior_complete(args.resume, model)):
            with_prior = " and its flow prior" if prior == "flow" else ""
            say(f"{args.resume}: the run is already complete ({plan.epochs} epochs{with_prior}); "
                f"nothing to do")
            return 0
        data_dir = run_data_dir(args, args.resume)
        trainer = T.resume_trainer(args.resume, args.threads, data_dir, reporter, loaded=(model, plan, path))
    else:
        prior = args.prior or "gaussian"
        cvae_done = False
        trainer = start_run(args, args.out or default_out(args.variant), reporter,
                            config_extra={"prior": args.prior} if args.prior else None)
    if not cvae_done:
        result = trainer.run(stop_after_epochs=args.stop_after_epochs)
        if result.status != "complete":
            return result.exit_code
    flow = None
    if prior == "flow":
        code = _train_prior(args, trainer)
        if code:
            return code
        if not args.no_images:
            from cvae.prior import open_prior

            flow = open_prior("flow", trainer.run_dir, trainer.model, trainer.model.threads)
    if not args.no_images:
        T.write_images(trainer, flow=flow)
        say(f"images written to {trainer.run_dir}")
    return 0


def run_prior_complete(run_dir, model):
    """Whether RUN/prior.cvae is a complete prior of `model`; one of other CVAE parameters
    (an earlier checkpoint's) is the error complete_run_prior gives."""
    from cvae import prior as P

    state, _ = P.prior_state(run_dir, model)
    if state == "stale":
        raise P.stale_prior_error(run_dir)
    return state == "complete"


def _train_prior(args, trainer):
    """`cvae train --prior flow` once the CVAE is complete: train (or finish) RUN/prior.cvae
    and print its time beside the CVAE's. Returns the exit code (non-zero: stopped)."""
    from cvae import train as T

    from cvae.prior import complete_run_prior, report_prior_training

    mode = "json" if args.json else "quiet" if args.quiet else "rich"
    status, prior, seconds, before = complete_run_prior(
        trainer.run_dir, trainer.model, trainer.train_set, trainer.model.threads, T.LAST_NAME,
        mode=mode)
    if prior is None:
        return 0  # trained already
    # The CVAE's time: its epochs' (training and the test ELBO), as metrics.jsonl has them.
    cvae_seconds = sum(r.get("seconds") or 0 for r in trainer.records)
    return report_prior_training(status, prior, seconds, mode, trainer.model.threads,
                                 f"cvae train --resume {trainer.run_dir}",
                                 resumed=before == "partial",
                                 cvae_seconds=cvae_seconds)


def add_train_parser(subparsers):
    from cvae.schedule import SCHEDULES

    sched_help = "\n".join(
        f"  {name:<12} {k}={v:g}: {cls.HELP.get(k, '')}"
        for name, cls in SCHEDULES.items() for k, v in cls.DEFAULTS.items())
    p = subparsers.add_parser(
        "train", formatter_class=Formatter,
        help="train a conditional VAE on MNIST digits",
        description=(
            "Train a conditional VAE. Each epoch prints the test set's negative ELBO at β = 1\n"
            "(nats per image) and saves RUN/epoch-NNNN.cvae and RUN/last.cvae; metrics go to\n"
            "RUN/metrics.jsonl. Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint\n"
            "and exits 130 (143); continue with --resume RUN.\n\n"
            "--prior flow: once the CVAE is complete, train a flow-matching prior over its latent\n"
            "codes (RUN/prior.cvae, the defaults of 'cvae prior train'), then draw samples-flow.pgm\n"
            "with it beside samples.pgm (N(0, I)); the prior's time is printed beside the CVAE's.\n"
            "Ctrl-C stops the prior the same way, and --resume RUN finishes it.\n\n"
            "schedules:\n"
            "  progressive  FAST (β from beta_start, learning rate x fast_lr_mult) -> BALANCED (β\n"
            "               to 1, rate back to --lr) -> QUALITY (β = 1, rate decays); ends at β = 1.\n"
            "               By default β = 1 throughout: half the run at --lr, then a cosine decay\n"
            "               (measured best at 30 epochs; a warm-up such as beta_start=0.01\n"
            "               beta_fast_end=0.3 fast_lr_mult=3 helps runs of a few epochs only)\n"
            "  constant     β = --beta and the learning rate fixed\n"
            "  seed         the original per-epoch formula: β = 1e-4 + 5e-6·epoch (< 150),\n"
            "               2e-4 + 2e-6·epoch (< 400), 5e-4 + 1e-6·epoch; constant lr. β stays ≪ 1:\n"
            "               a near-autoencoder, so its ELBO is not comparable with the others'\n"
            "schedule parameters (--schedule-set KEY=VALUE) and defaults:\n" + sched_help),
        epilog="With --resume, options left out are taken from the run; options given must match it.")
    add_arch_options(p, variant_default=None)
    p.set_defaults(variant=None)
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs to train (default: 30)")
    p.add_argument("--batch", type=positive_int, default=None, help="minibatch size (default: 64)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="base learning rate (Adam); schedules scale it (default: 1e-3)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="seed of the initialisation, the batch order and the noise (default: 0)")
    p.add_argument("--digits", type=digits_type, default=None,
                   help="digits to train on, e.g. 0-9, 0,1 or 0-4,7 (default: mini/mid 0,1; full 0-9)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default=None,
                   help="β / learning-rate schedule (default: progressive)")
    p.add_argument("--beta", type=non_negative_float, default=None,
                   help="β for --schedule constant (default: 1)")
    p.add_argument("--schedule-set", action="append", metavar="KEY=VALUE", default=None,
                   help="set a schedule parameter (repeatable; see above)")
    p.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="OpenMP threads (default: the CPUs available to this process)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST directory (default: $CVAE_DATA, else the cache, fetched when empty)")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run directory (default: runs/<variant>-<timestamp>); must not hold a run")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint, with its configuration")
    p.add_argument("--stop-after-epochs", type=positive_int, metavar="K", default=None,
                   help="stop cleanly (exit 0) after K epochs of this invocation")
    from cvae.prior import PRIORS

    p.add_argument("--prior", choices=PRIORS, default=None,
                   help="the latent prior the run ends with: flow trains RUN/prior.cvae after "
                        "the CVAE and adds samples-flow.pgm; gaussian is N(0, I), nothing to "
                        "train (default: gaussian; with --resume, the run's, and a --prior given "
                        "is recorded)")
    p.add_argument("--no-images", action="store_true",
                   help="skip the reconstructions, digit sheet and interpolations after training")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print nothing while training")
    out.add_argument("--json", action="store_true",
                     help="one JSON object per epoch on stdout instead of the progress display")
    p.set_defaults(func=cmd_train, _finalize=_finalize_train)


def _finalize_train(args):
    # With --resume an unset option means "as the run has it"; a fresh run gets the defaults.
    if args.variant is None and not args.resume:
        args.variant = DEFAULT_VARIANT


# ---------------------------------------------------------------- version and parser


class VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and the kernel build in use, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from cvae.kernels import build_name, kernels

        print(f"cvae {cvae.__version__} (kernels: {build_name()} build, isa {kernels().isa}; "
              f"Python {sys.version.split()[0]})")
        parser.exit(0)


def build_parser():
    parser = Parser(prog="cvae", formatter_class=Formatter,
                    description="Fast CPU trainer and generator for conditional VAEs on MNIST digits.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    add_train_parser(sub)

    p = sub.add_parser("info", formatter_class=Formatter,
                       help="parameter count and memory of an architecture",
                       description="Parameter count and the slab's size by section (MB).")
    add_arch_options(p)
    p.add_argument("--batch", type=positive_int, default=64, help="batch size the slab is sized for")
    p.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="threads (sizes the per-thread scratch)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("data", formatter_class=Formatter, help="fetch or verify the MNIST files",
                       description="Fetch MNIST into the cache, or verify a directory's files.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    data_sub.required = True
    q = data_sub.add_parser("fetch", formatter_class=Formatter, help="download MNIST into the cache",
                            description="Download MNIST (verified sha256) into the cache directory.")
    q.add_argument("--cache", metavar="DIR", default=None,
                   help="cache directory (default: $CVAE_CACHE, else $XDG_CACHE_HOME/cvae/mnist, "
                        "else ~/.cache/cvae/mnist)")
    q.set_defaults(func=cmd_data_fetch)
    q = data_sub.add_parser("verify", formatter_class=Formatter,
                            help="check the MNIST files against the published checksums",
                            description="Check the four MNIST files' content sha256.")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST directory (default: $CVAE_DATA, else the cache)")
    q.set_defaults(func=cmd_data_verify)

    from cvae import bench, classifier, evaluate, prior, report, sample, sweep

    for module in (sample, evaluate, prior, classifier, sweep, report, bench):
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv=None):
    try:
        from threadpoolctl import threadpool_limits

        # OpenMP (our kernels) is the only thread pool that should run; numpy's BLAS stays at one.
        _limits = threadpool_limits(1)  # noqa: F841  (kept alive for the process)
    except Exception:
        pass
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        finalize = getattr(args, "_finalize", None)
        if finalize is not None:
            finalize(args)
        code = args.func(args)
        return 0 if code is None else int(code)
    except CvaeError as e:
        message = " ".join(str(e).split("\n"))
        print(f"cvae: error: {message}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except MemoryError:
        print("cvae: error: out of memory: choose smaller sizes (--hidden, --batch, "
              "--per-digit ...)", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("cvae: interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
