"""`cvae train` and `cvae prior train`: the options, and what is printed."""

import json
import os
import shlex
import sys
import time

from cvae import rundir as R
from cvae.atomic import check_writable
from cvae.cli.options import (Formatter, add_arch_options, add_precision, add_output_mode,
                              add_subcommands, add_threads, digits_type, mode, non_negative_float,
                              non_negative_int, notice, number_type, positive_float,
                              positive_int, probability, say)
from cvae.data import Dataset
from cvae.errors import CvaeError
from cvae.kernels import default_threads, resolve_precision
from cvae.model import ConvArch
from cvae.prior import (DEFAULT_BATCH, DEFAULT_BLOCKS, DEFAULT_DROP, DEFAULT_EPOCHS,
                        DEFAULT_HIDDEN, DEFAULT_LR, PRIORS)
from cvae.schedule import SCHEDULES, parse_schedule_settings
from cvae.train import (DEFAULT_PRECISION, DEFAULT_VARIANT, JsonReporter, Reporter,
                        RichReporter, make_arch, make_plan)
from cvae.workflows import (Finish, finish_run, load_resume_point, resume_run, start_run,
                            train_run_prior)

# Options that fix the computation: with --resume they must match the run (or be left out).
# --prior is not one: the prior is trained after the CVAE, on its final parameters.
DEFAULT_PRIOR = "flow"
RUN_OPTIONS = ("variant", "hidden", "channels", "latent", "act", "digits", "epochs", "batch", "lr", "seed",
               "schedule", "beta", "schedule_set", "precision")


def reporter_for(args):
    return {"json": JsonReporter, "quiet": Reporter, "rich": RichReporter}[mode(args)]()


def default_out(variant):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join("runs", f"{variant}-{stamp}")
    n = 1
    while os.path.exists(out):
        n += 1
        out = os.path.join("runs", f"{variant}-{stamp}-{n}")
    return out


def resolved_precision(args, say_to, default=DEFAULT_PRECISION):
    """--precision resolved (auto: bf16 where it is faster), saying why when auto was asked
    for (a run's config.json and its start line name the precision either way)."""
    precision, why = resolve_precision(args.precision or default)
    if args.precision == "auto":
        say_to(f"precision auto: {precision} ({why})")
    return precision


def plan_from_args(args, say_to):
    return make_plan(variant=args.variant, hidden=args.hidden, latent=args.latent, act=args.act,
                     channels=args.channels,
                     digits=args.digits, schedule=args.schedule, beta=args.beta,
                     schedule_settings=parse_schedule_settings(args.schedule_set),
                     epochs=args.epochs, seed=args.seed, batch=args.batch, lr=args.lr,
                     precision=resolved_precision(args, say_to))


def arch_with(arch, variant, options):
    """The architecture --variant and the size options describe: the variant's sizes with the
    options over them, or without --variant, the run's own (arch) with the options over them."""
    if variant is None:
        conv = isinstance(arch, ConvArch)
        variant = "conv" if conv else DEFAULT_VARIANT
        own = (dict(hidden=(arch.hidden,), channels=arch.channels) if conv
               else dict(hidden=(arch.h1, arch.h2)))
        options = {**own, "latent": arch.latent, "act": arch.act, **options}
    return make_arch(variant, **options)


def check_resume_conflicts(args, plan, path):
    """Options given with --resume must agree with the run's configuration."""
    given = {name: getattr(args, name) for name in RUN_OPTIONS if getattr(args, name) is not None}
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise CvaeError("--resume continues in the run's own directory: leave out --out")
    problems = []
    arch_options = {k: given[k] for k in ("hidden", "channels", "latent", "act") if k in given}
    if arch_options or "variant" in given:
        wanted = arch_with(plan.arch, given.get("variant"), arch_options)
        if wanted != plan.arch:
            problems.append(f"the architecture {wanted.describe()} (the run is "
                            f"{plan.arch.describe()})")
    if "precision" in given:
        given["precision"] = resolve_precision(given["precision"])[0]
    checks = {"digits": tuple(plan.digits), "epochs": plan.epochs, "batch": plan.batch,
              "lr": plan.lr, "seed": plan.seed, "schedule": plan.schedule.name,
              "precision": plan.precision}
    for name, have in checks.items():
        if name in given and given[name] != have:
            problems.append(f"--{name} {given[name]!r} (the run has {have!r})")
    if "beta" in given and plan.schedule.params.get("beta") != given["beta"]:
        problems.append(f"--beta {given['beta']} (the run's schedule is {plan.schedule.describe()})")
    if "schedule_set" in given:
        for key, value in parse_schedule_settings(given["schedule_set"]).items():
            if plan.schedule.params.get(key) != value:
                problems.append(f"--schedule-set {key}={value:g} (the run's schedule is "
                                f"{plan.schedule.describe()})")
    if problems:
        raise CvaeError(f"--resume keeps the run's configuration ({path}), but these options "
                        f"differ: {'; '.join(problems)}")


def report_prior_training(status, trainer, seconds, how, threads, resume_command,
                          resumed=False, cvae_seconds=None):
    """Say how a prior's training ended and return the exit code: stopped (stderr: where it
    was saved and resume_command; 130/143), or complete (one JSON object with --json, a line
    otherwise, and with cvae_seconds the CVAE's training time beside the prior's)."""
    plan, out = trainer.plan, trainer.path
    if status == "interrupted":
        print(f"cvae: stopped the flow prior at step {plan.step:,} of {trainer.total:,}; saved "
              f"{out}\ncvae: resume with: {resume_command}", file=sys.stderr, flush=True)
        return trainer.exit_code()
    loss = trainer.losses[-1] if trainer.losses else None
    result = {"prior": out, "epochs": plan.epochs, "loss": loss,
              "seconds": seconds, "resumed": resumed, "codes": len(trainer.labels),
              "dims": list(plan.arch.dims), "params": plan.arch.n_params(), "threads": threads}
    if cvae_seconds is not None:
        result["cvae_seconds"] = cvae_seconds
    if how == "json":
        print(json.dumps(result), flush=True)
    elif how == "rich":
        here = " (resumed: this invocation's time)" if resumed else ""
        print(f"flow prior: {plan.epochs} epoch{'s' * (plan.epochs != 1)} over "
              f"{len(trainer.labels):,} codes ({plan.arch.latent} active latent dimensions), "
              f"loss {loss:.4f}, {seconds:.1f} s{here} on {threads} threads -> {out}", flush=True)
        if cvae_seconds:
            print(f"training time: CVAE {cvae_seconds:.1f} s, flow prior {seconds:.1f} s "
                  f"({seconds / cvae_seconds:.0%} of the CVAE's)", flush=True)
    return 0


# ---------------------------------------------------------------- cvae train


def run_prior_complete(run_dir, model):
    """Whether RUN/prior.cvae is a complete prior of `model`; one of other CVAE parameters
    (an earlier checkpoint's) is the error finishing the run would give."""
    state, _ = R.prior_state(run_dir, model)
    if state == "stale":
        raise R.stale_prior_error(run_dir)
    return state == "complete"


def keep_type(text):
    """--keep: a positive number of epoch checkpoints, or 'all'."""
    if text.strip().lower() == "all":
        return "all"
    return positive_int(text)


def cmd_train(args):
    run_dir = args.resume or args.out or default_out(args.variant)
    if not args.resume:
        R.check_fresh_run_dir(run_dir, create=False)  # before the lock makes the directory
    with R.training_lock(run_dir, shlex.join(["cvae", *args.argv])):
        return train_locked(args, run_dir)


def train_locked(args, run_dir):
    tell = say(args)
    reporter = reporter_for(args)
    if args.resume:
        model, plan, path = load_resume_point(args.resume, args.threads)
        check_resume_conflicts(args, plan, path)
        prior = args.prior or R.recorded_prior(args.resume)
        if args.prior is not None:
            R.record_prior(args.resume, args.prior)
        cvae_done = plan.epoch >= plan.epochs
        if cvae_done and (prior != "flow" or run_prior_complete(args.resume, model)):
            with_prior = " and its flow prior" if prior == "flow" else ""
            tell(f"{args.resume}: the run is already complete ({plan.epochs} epochs"
                 f"{with_prior}); nothing to do")
            return 0
        data_dir = R.run_data_dir(args.data, args.resume, say=tell, notice=notice(args))
        trainer = resume_run(args.resume, args.threads, data_dir, reporter,
                             loaded=(model, plan, path), keep=args.keep)
    else:
        # The flow prior by default: N(0, I) samples are visibly worse (README, "The flow
        # prior") and the prior costs a few percent of the CVAE's training time.
        prior = args.prior or DEFAULT_PRIOR
        cvae_done = False
        extra = {"variant": args.variant, "argv": args.argv, "prior": prior}
        trainer = start_run(run_dir, plan_from_args(args, tell), args.data, args.threads, reporter,
                            config_extra=extra, say=tell, notice=notice(args), keep=args.keep)
    if not cvae_done:
        result = trainer.run(stop_after_epochs=args.stop_after_epochs)
        if result.status != "complete":
            return result.exit_code
    flow = prior == "flow"
    done = finish_run(trainer, Finish(prior=flow, images=not args.no_images,
                                      flow_sheet=flow and not args.no_images),
                      mode=mode(args))
    if done.prior_trainer is not None:
        # The CVAE's time: its epochs' (training and the test ELBO), as metrics.jsonl has them.
        cvae_seconds = sum(r.get("seconds") or 0 for r in trainer.records)
        code = report_prior_training("interrupted" if done.code else "complete",
                                     done.prior_trainer, done.prior_seconds, mode(args),
                                     trainer.model.threads,
                                     f"cvae train --resume {trainer.run_dir}",
                                     resumed=done.prior_before == "partial",
                                     cvae_seconds=cvae_seconds)
        if code:
            return code
    if not args.no_images:
        tell(f"images written to {trainer.run_dir}")
    return 0


def _finalize_train(args):
    # With --resume an unset option means "as the run has it"; a fresh run gets the defaults.
    if not args.resume:
        args.variant = args.variant or DEFAULT_VARIANT


def add_train_parser(subparsers):
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
            "Once the CVAE is complete, a flow-matching prior is trained over its latent codes\n"
            "(RUN/prior.cvae, the defaults of 'cvae prior train'; --prior gaussian skips it), then\n"
            "samples-flow.pgm is drawn with it beside samples.pgm (N(0, I)); the prior's time is\n"
            "printed beside the CVAE's. Ctrl-C stops the prior the same way, and --resume RUN\n"
            "finishes it.\n\n"
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
    add_precision(p, None, f"the training's GEMMs (recorded in the run; default: "
                           f"{DEFAULT_PRECISION}, with --resume the run's)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST directory (default: $CVAE_DATA, else the cache, fetched when empty)")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run directory (default: runs/<variant>-<timestamp>); must not hold a run")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint, with its configuration")
    p.add_argument("--stop-after-epochs", type=positive_int, metavar="K", default=None,
                   help="stop cleanly (exit 0) after K epochs of this invocation")
    p.add_argument("--keep", type=keep_type, metavar="N|all", default=None,
                   help=f"epoch checkpoints (epoch-NNNN.cvae) kept besides last.cvae: the newest "
                        f"N, or all (default: {R.DEFAULT_KEEP}; with --resume, the run's)"),
    p.add_argument("--prior", choices=PRIORS, default=None,
                   help="the latent prior the run ends with: flow trains RUN/prior.cvae after "
                        "the CVAE and adds samples-flow.pgm; gaussian is N(0, I), nothing to "
                        f"train (default: {DEFAULT_PRIOR}; with --resume, the run's, and a "
                        "--prior given is recorded)")
    p.add_argument("--no-images", action="store_true",
                   help="skip the reconstructions, digit sheet and interpolations after training")
    add_output_mode(p, json_help="one JSON object per epoch on stdout instead of the progress "
                                 "display (then, with the flow prior, one per prior epoch and "
                                 "the prior's summary)",
                    quiet_help="print nothing while training")
    p.set_defaults(func=cmd_train, _finalize=_finalize_train)


# ---------------------------------------------------------------- cvae prior train


def cmd_prior_train(args):
    path, run_dir = R.resolve_checkpoint(args.checkpoint)
    out = check_writable(R.prior_path(run_dir))
    with R.training_lock(run_dir, shlex.join(["cvae", *args.argv])):
        return prior_train_locked(args, path, run_dir, out)


def prior_train_locked(args, path, run_dir, out):
    given = {k: getattr(args, k) for k in ("hidden", "blocks", "epochs", "batch", "lr", "drop",
                                           "seed", "precision") if getattr(args, k) is not None}
    if args.resume:
        if not os.path.isfile(out):
            raise CvaeError(f"--resume: {run_dir} has no {R.PRIOR} to continue")
        if given:
            raise CvaeError(f"--resume continues {out} with its own settings: leave out "
                            + ", ".join(f"--{k}" for k in given))
    elif os.path.exists(out):
        raise CvaeError(f"{run_dir} already has a prior ({R.PRIOR}): continue it with "
                        f"--resume, or delete it to train a new one")
    model, meta = R.open_model(path, args.threads)
    digits = R.checkpoint_digits(meta, path)
    if not args.resume:  # a new prior: --precision, else the CVAE's
        given["precision"] = (resolved_precision(args, say(args)) if args.precision
                              else meta.get("precision", "fp32"))
    data_dir = R.run_data_dir(args.data, run_dir, say=say(args), notice=notice(args))
    train_set = Dataset.load(data_dir, "train", digits)
    trained_on = (meta.get("data") or {}).get("train_images")
    if trained_on is not None and trained_on != len(train_set):
        raise CvaeError(f"{path} was trained on {trained_on:,} training images, but the data "
                        f"gives {len(train_set):,}: pass the run's --data")
    status, trainer, seconds = train_run_prior(run_dir, model, train_set, model.threads,
                                               os.path.basename(path), given, args.resume,
                                               mode(args))
    return report_prior_training(status, trainer, seconds, mode(args), model.threads,
                                 f"cvae prior train --checkpoint {run_dir} --resume",
                                 resumed=args.resume)


def add_prior_parser(subparsers):
    blocks = number_type(int, "an integer", lambda v: 1 <= v <= 8, "an integer from 1 to 8")
    p = subparsers.add_parser(
        "prior", formatter_class=Formatter,
        help="train a run's flow-matching prior (better samples than N(0, I))",
        description="A learned prior over a trained CVAE's latent codes: conditional flow "
                    "matching, see the README's\n'The flow prior'. 'generate', 'eval' and "
                    "'report' use it once the run has prior.cvae.")
    sub = add_subcommands(p, "prior_command")
    q = sub.add_parser(
        "train", formatter_class=Formatter, help="train RUN/prior.cvae",
        description="Encode the run's training images once, then train the velocity network "
                    "v(z_t, t, y) on\nz_t = (1 - t)·z0 + t·z1, target z1 - z0, z1 = mu + "
                    "sigma·eps a code, z0 ~ N(0, I), t ~ U[0, 1),\nin the latent dimensions "
                    "whose mu varies over the training images (the others are N(0, 1)\n"
                    "noise for every image already).\nSaves RUN/prior.cvae after every epoch; "
                    "Ctrl-C (or SIGTERM) saves and exits 130 (143); continue\nwith --resume.")
    q.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="a run directory (its last.cvae) or a .cvae checkpoint; the prior is "
                        "written beside it as prior.cvae")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST directory (default: $CVAE_DATA, else the run's, else the cache)")
    q.add_argument("--epochs", type=positive_int, default=None,
                   help=f"passes over the codes (default: {DEFAULT_EPOCHS})")
    q.add_argument("--batch", type=positive_int, default=None,
                   help=f"codes per step (default: {DEFAULT_BATCH})")
    q.add_argument("--lr", type=positive_float, default=None,
                   help=f"peak learning rate, cosine decay to 0 (default: {DEFAULT_LR:g})")
    q.add_argument("--hidden", type=positive_int, default=None,
                   help=f"width of the velocity network (default: {DEFAULT_HIDDEN})")
    q.add_argument("--blocks", type=blocks, default=None,
                   help=f"residual blocks, 1 to 8 (default: {DEFAULT_BLOCKS})")
    q.add_argument("--drop", type=probability, default=None,
                   help="probability that a training label is replaced by the null label, for "
                        f"--guidance (default: {DEFAULT_DROP:g})")
    q.add_argument("--seed", type=non_negative_int, default=None,
                   help="seed of the initialisation, order and noise (default: 0)")
    add_precision(q, None, "the velocity network's GEMMs (default: the one the CVAE was "
                           "trained in)")
    add_threads(q)
    q.add_argument("--resume", action="store_true",
                   help="continue RUN/prior.cvae where it stopped, with its settings")
    add_output_mode(q)
    q.set_defaults(func=cmd_prior_train)


def register(subparsers):
    add_train_parser(subparsers)
    add_prior_parser(subparsers)

