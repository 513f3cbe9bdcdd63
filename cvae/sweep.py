"""`cvae sweep`: train every combination of a few settings, evaluate each, write one table.

    cvae sweep --latent 128,256 [--hidden 640x320,512x256] [--act elu,relu]
               [--schedule progressive,constant] --epochs E --out DIR

Every combination is one run directory DIR/<name>, named after the settings that make up the
grid, always in the same form: ``latent128-h640x320-elu-progressive``. The other settings
(--variant, --digits, --epochs, --batch, --lr, --seed) are shared by every run. Each run is
trained in-process exactly as `cvae train` trains it (cli.start_run), then its images are
written (train.write_images: reconstructions, the samples.pgm digit sheet, interpolations) and
it is evaluated (evaluate.run_eval, which writes DIR/<name>/eval.json). The table of all the
runs goes to DIR/sweep.jsonl (one object per run and prior) and DIR/sweep.md.

--prior gaussian,flow is an axis that does not change the CVAE: each run is trained once, and
with flow asked it then gets its flow prior (prior.train_run_prior, as `cvae prior train`
trains it: RUN/prior.cvae, its defaults but --prior-epochs), the flow's digit sheet
samples-flow.pgm, and an evaluation judging each asked prior (run_eval's prior "both"). The
table has one row per (run, prior): the metrics of the generated digits are that prior's
(eval.json's by_prior), the others (ELBO, IWAE, SSIM, the test set's diversity) the run's.

Restarting: a run whose training is complete and whose eval.json is the evaluation of its
final checkpoint (with the same k, seed, samples, temperature, judging every asked prior, the
flow with the same sampling) is skipped; with flow asked it also needs a complete prior.cvae of
its final checkpoint and samples-flow.pgm, neither eval.json nor the sheet older than the
prior. A run with a partial checkpoint is resumed (train.resume_trainer); a complete run gets
only what it lacks: its prior trained or resumed (one of another checkpoint is trained anew in
its place), its sheets, its evaluation. A run directory holding a run with other settings, or
a flow prior of the run with other settings, is an error (before anything is trained).
Ctrl-C / SIGTERM stop the sweep at once with exit code 130 / 143 (the trainer, or the prior's,
saves a checkpoint first), and the same command continues it.

`cvae sweep --collect DIR` builds the same table from every finished run under DIR (a
subdirectory with config.json and eval.json, and a complete training), whoever made them:
this command, or independent `cvae train --out DIR/name` + `cvae eval --checkpoint DIR/name`
jobs (Slurm array tasks, GNU parallel; `--commands` prints those job lines, with a
`cvae prior train` between them when flow is asked). Its rows are those of the priors each
eval.json judged (an eval.json from before the flow prior: N(0, I), its top-level figures).
"""

import argparse
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time

from cvae import prior as P
from cvae.errors import CvaeError
from cvae.evaluate import (DEFAULT_K, DEFAULT_SAMPLES, DEFAULT_TEMPERATURE, EVAL_JSON,
                           SAMPLE_METRICS)
from cvae.sample import FLOW_SAMPLES_NAME, STALE_SECONDS, flow_sheet_problem

SWEEP_MD = "sweep.md"
SWEEP_JSONL = "sweep.jsonl"
SAMPLES_NAME = "samples.pgm"
#: What train.write_images leaves in a run directory: all of them, or the run gets them again.
RUN_PICTURES = (SAMPLES_NAME, "reconstructions.pgm", "interpolations.pgm",
                "interpolations-classes.pgm", "curves.png", "latent.png")
#: eval_wanted's classifier when --classifier is not given: the one eval picks by itself
#: (the shipped one, or none for data it was not made for), not a file the user chose.
DEFAULT_CLASSIFIER = "default"

#: The grid options, in the order that makes up a run's name.
GRID = ("latent", "hidden", "act", "schedule")
#: Options shared by every run of a sweep (also training options --collect refuses).
SHARED = ("variant", "digits", "epochs", "batch", "lr", "seed", "threads", "data")
EVAL_OPTIONS = ("k", "samples", "temperature", "classifier")
#: The prior axis: which priors generate the judged digits (each one row of the table), and
#: the flow prior's training.
PRIOR_OPTIONS = ("prior", "prior_epochs")
#: The sweep's priors, in the table's order of a run's rows.
PRIORS = tuple(sorted(P.PRIORS))
DEFAULT_PRIORS = ("gaussian",)
#: The flow prior's seed: cvae prior train's default (prior.train_prior's), whatever the run's.
PRIOR_SEED = 0
#: The flow's sampling in the sweep's evaluations (cvae eval's defaults).
FLOW_SAMPLING = {"steps": P.DEFAULT_STEPS, "method": P.DEFAULT_METHOD,
                 "guidance": P.DEFAULT_GUIDANCE}
#: cvae eval's defaults of the options a sweep passes on.
EVAL_DEFAULTS = {"k": DEFAULT_K, "samples": DEFAULT_SAMPLES, "temperature": DEFAULT_TEMPERATURE}
#: Metrics copied from eval.json into the table (None when absent), in the row's order; those
#: of SAMPLE_METRICS are the prior's (eval.json's by_prior), the others the run's.
METRICS = ("neg_elbo", "rec", "kl", "iwae_nll", "k", "ssim", "cond_accuracy", "fid",
           "fid_test_floor", "diversity", "diversity_test", "temperature")


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside training (the trainer handles its own): stop the sweep now."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------- list options


def _list_type(parse_item, example):
    """An argparse type for a comma-separated list: no empty items, no duplicates."""

    def parse(text):
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give a list like {example}")
        values = []
        for item in items:
            value = parse_item(item.strip())
            if value in values:
                raise argparse.ArgumentTypeError(f"{text!r} lists {item.strip()} twice")
            values.append(value)
        return tuple(values)

    return parse


def _latent_item(text):
    if not re.fullmatch(r"\d+", text) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (e.g. 128,256)")
    return int(text)


def _hidden_item(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text, flags=re.IGNORECASE)
    if not match or min(int(match.group(1)), int(match.group(2))) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a pair of hidden sizes H1xH2: give e.g. 640x320,512x256")
    return int(match.group(1)), int(match.group(2))


def _choice_item(choices, what):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (choose from {','.join(choices)})")
        return text

    return parse


def _digits_text(digits):
    """(0,1,2,3,5) -> '0-3,5'."""
    digits = sorted(digits)
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


# ---------------------------------------------------------------- the runs of a sweep


class Run:
    """One combination: its name, its run directory, the train options and the plan."""

    def __init__(self, name, run_dir, train_args, plan):
        self.name = name
        self.run_dir = run_dir
        self.train_args = train_args
        self.plan = plan
        self.state = None      # "new", "restart", "partial", "complete", "finished"
        self.eval_problem = None
        # of a complete run with the flow prior asked: "none", "stale", "partial", "complete"
        self.prior_state = None
        self.prior_problem = None
        self.flow_sheet_problem = None

    def train_options(self, args):
        """The `cvae train` options (without --out) that start this run."""
        plan = self.plan
        opts = ["--hidden", f"{plan.arch.h1},{plan.arch.h2}", "--latent", str(plan.arch.latent),
                "--act", plan.arch.act, "--schedule", plan.schedule.name,
                "--digits", _digits_text(plan.digits), "--epochs", str(plan.epochs),
                "--batch", str(plan.batch), "--lr", repr(plan.lr), "--seed", str(plan.seed)]
        if args.threads is not None:
            opts += ["--threads", str(args.threads)]
        if args.data is not None:
            opts += ["--data", args.data]
        return opts


def run_name(plan):
    a = plan.arch
    return f"latent{a.latent}-h{a.h1}x{a.h2}-{a.act}-{plan.schedule.name}"


def plan_runs(args):
    """Every combination of the grid options as a Run (in the grid's order)."""
    from cvae import cli

    lists = [getattr(args, name) or (None,) for name in GRID]
    runs, names = [], set()
    for latent, hidden, act, schedule in itertools.product(*lists):
        ns = argparse.Namespace(
            variant=args.variant or cli.DEFAULT_VARIANT, hidden=hidden, latent=latent, act=act,
            schedule=schedule, digits=args.digits, epochs=args.epochs, batch=args.batch,
            lr=args.lr, seed=args.seed, beta=None, schedule_set=None, data=args.data,
            threads=args.threads, json=args.json, quiet=args.quiet)
        plan = cli.build_plan(ns)
        name = run_name(plan)
        if name in names:  # distinct list values always give distinct names; never clobber
            raise CvaeError(f"two combinations of the sweep are the same run ({name})")
        names.add(name)
        run = Run(name, os.path.join(args.out, name), ns, plan)
        ns.argv = ["train", "--out", run.run_dir, *run.train_options(args)]
        runs.append(run)
    return runs


def eval_settings(args):
    """k, samples and temperature: as given, else cvae eval's defaults."""
    return {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in EVAL_DEFAULTS.items()}


def eval_kwargs(args, seed):
    """Keyword arguments for evaluate.run_eval."""
    return {"data": None, "seed": seed, "threads": args.threads, "classifier": args.classifier,
            **eval_settings(args)}


def eval_wanted(args, seed):
    """{eval.json key: value} an existing evaluation must have to be reused."""
    # eval.json names the classifier it used by absolute path
    classifier = os.path.abspath(args.classifier) if args.classifier is not None else DEFAULT_CLASSIFIER
    return {"seed": seed, **eval_settings(args), "classifier": classifier}


def sweep_priors(args):
    """The priors asked (--prior), in the table's order."""
    return tuple(p for p in PRIORS if p in (args.prior or DEFAULT_PRIORS))


def eval_prior_choice(priors):
    """run_eval's prior for these priors: 'both', or the one."""
    return "both" if len(priors) > 1 else priors[0]


def prior_settings(args):
    """train_run_prior's settings of a run's flow prior: --prior-epochs and cvae prior train's
    seed (the others are its defaults too, as 'cvae train --prior flow' trains it)."""
    return {"epochs": P.DEFAULT_EPOCHS if args.prior_epochs is None else args.prior_epochs,
            "seed": PRIOR_SEED}


def prior_wanted(args, plan):
    """{prior.cvae header key: value} of the flow prior the sweep trains for a run."""
    return {"arch": P.PriorArch(latent=plan.arch.latent).to_json(), "batch": P.DEFAULT_BATCH,
            "lr": P.DEFAULT_LR, "drop": P.DEFAULT_DROP, **prior_settings(args)}


# ---------------------------------------------------------------- the state of a run directory


_CONFIG_KEYS = ("arch", "digits", "schedule", "epochs", "seed", "batch", "lr")


def config_differences(have, want):
    """The settings (of _CONFIG_KEYS) in which a recorded configuration differs from want."""
    out = []
    for key in _CONFIG_KEYS:
        if have.get(key) != want.get(key):
            out.append(f"{key} {_short(have.get(key))} (this sweep: {_short(want.get(key))})")
    return out


def _short(value):
    if isinstance(value, dict) and set(value) >= {"h1", "h2", "latent"}:
        return f"{value['h1']}-{value['h2']}-{value['latent']} {value.get('act', '?')}"
    if isinstance(value, dict) and "name" in value:
        return value["name"] + (" " + ",".join(f"{k}={v:g}" for k, v in value.get("params", {}).items())
                                if value.get("params") else "")
    if isinstance(value, list):
        return _digits_text(value) if all(isinstance(v, int) for v in value) else str(value)
    return str(value)


def _read_json(path):
    """(dict, None) or (None, why not)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, f"no {os.path.basename(path)}"
    except (OSError, ValueError) as e:
        return None, f"{os.path.basename(path)} is unreadable ({getattr(e, 'strerror', None) or e})"
    if not isinstance(data, dict):
        return None, f"{os.path.basename(path)} is not a JSON object"
    return data, None


def judged_priors(data):
    """The priors (of PRIORS, in the table's order) whose generated digits an eval.json judged:
    its by_prior's. One from before the flow prior (no by_prior) judged N(0, I). Without a
    classifier by_prior is empty (there are no sample metrics at all): the top-level prior, an
    evaluation with the flow standing for both."""
    by = data.get("by_prior")
    if not isinstance(by, dict):
        names = ["gaussian"]
    elif by:
        names = list(by)
    else:
        names = ["flow", "gaussian"] if data.get("prior") == "flow" else ["gaussian"]
    return [p for p in PRIORS if p in names]


def _judged(data, prior):
    """eval.json's figures of one prior: by_prior's; else (an eval.json from before the flow
    prior, or one without a classifier) the top level when it is that prior's."""
    by = data.get("by_prior")
    if isinstance(by, dict) and by:
        return by.get(prior) if isinstance(by.get(prior), dict) else {}
    top = data.get("prior") if isinstance(by, dict) else "gaussian"
    if top != prior and not (top == "flow" and isinstance(by, dict)):
        return {}
    settings = data.get("prior_settings") if top == prior else None
    return {**(settings if isinstance(settings, dict) else {}),
            **{key: data.get(key) for key in SAMPLE_METRICS}}


def _older(path, than, slack=STALE_SECONDS):
    """Whether file path is older than file than (False when either is missing)."""
    try:
        return os.path.getmtime(path) + slack < os.path.getmtime(than)
    except OSError:
        return False


def eval_problem(run_dir, epochs, wanted=None, priors=None, flow=None):
    """None when run_dir/eval.json evaluates the run's final checkpoint (and, given wanted,
    with those settings; given priors, judging each of them, the flow with the sampling of
    flow); otherwise why it does not. An eval.json that judged the flow prior must not be
    older than the run's prior.cvae."""
    from cvae.checkpoint import LAST_NAME, epoch_checkpoint_path

    path = os.path.join(run_dir, EVAL_JSON)
    data, why = _read_json(path)
    if data is None:
        return why
    named = data.get("checkpoint")
    finals = (LAST_NAME, os.path.basename(epoch_checkpoint_path(run_dir, epochs)))
    if not isinstance(named, str) or os.path.basename(named) not in finals:
        return f"eval.json is of another checkpoint ({named})"
    checkpoint = os.path.join(run_dir, os.path.basename(named))
    try:
        if os.path.getmtime(path) + STALE_SECONDS < os.path.getmtime(checkpoint):
            return f"eval.json is older than {os.path.basename(named)}"
    except OSError:
        pass  # a run directory kept without its checkpoints: nothing to compare
    for key, value in (wanted or {}).items():
        if key not in data:
            return f"eval.json does not record {key}"
        if key == "classifier" and value == DEFAULT_CLASSIFIER:
            from cvae.classifier import SHIPPED

            if data[key] not in (None, SHIPPED):
                return f"eval.json was judged by {data[key]} (this sweep: the default classifier)"
        elif data[key] != value:
            return f"eval.json has {key} {data[key]} (this sweep: {value})"
    judged = judged_priors(data)
    for prior in priors or ():
        if prior not in judged:
            return f"eval.json does not judge the {prior} prior"
    if flow is not None and "flow" in (priors or ()):
        got = _judged(data, "flow")
        for key, value in flow.items():
            if got.get(key) != value:
                return f"eval.json's flow prior has {key} {got.get(key)} (this sweep: {value})"
    if "flow" in (judged if priors is None else priors) and _older(path, P.prior_path(run_dir)):
        return f"eval.json is older than {P.PRIOR_NAME}"
    return None


def training_state(run_dir):
    """(state, plan or None): "none" (no checkpoint), "partial" or "complete", from the
    newest checkpoint's header (fully verified)."""
    from cvae.checkpoint import latest_checkpoint, load_checkpoint
    from cvae.train import KIND, Plan

    path = latest_checkpoint(run_dir)
    if path is None:
        return "none", None
    meta, _, _ = load_checkpoint(path, expected_kind=KIND)
    plan = Plan.from_meta(meta, path)
    return ("complete" if plan.epoch >= plan.epochs else "partial"), plan


def inspect_run(run, wanted_eval, priors=DEFAULT_PRIORS, wanted_prior=None):
    """Set run.state (and run.eval_problem, and with the flow prior asked run.prior_state,
    run.prior_problem and run.flow_sheet_problem); a directory holding another run, or a
    flow prior of this run with other settings than wanted_prior, is an error."""
    from cvae.train import CONFIG_NAME, METRICS_NAME, recorded_config

    run_dir = run.run_dir
    want = run.plan.to_config()
    if not os.path.exists(run_dir):
        run.state = "new"
        return
    if not os.path.isdir(run_dir):
        raise CvaeError(f"{run_dir} exists and is not a directory: choose another --out")
    state, plan = training_state(run_dir)
    if state == "none":
        if not any(os.path.exists(os.path.join(run_dir, n)) for n in (CONFIG_NAME, METRICS_NAME)):
            run.state = "new"
            return
        differ = config_differences(recorded_config(run_dir), want)
        if differ:
            raise CvaeError(f"{run_dir} holds another run's outputs ({'; '.join(differ)}): "
                            f"choose another --out")
        run.state = "restart"  # this run, stopped before its first checkpoint
        return
    differ = config_differences(plan.to_config(), want)
    if differ:
        raise CvaeError(f"{run_dir} holds a run with other settings: {'; '.join(differ)}; choose "
                        f"another --out (or the run's own settings)")
    if state == "partial":
        run.state = "partial"
        return
    run.eval_problem = eval_problem(run_dir, plan.epochs, wanted_eval, priors, FLOW_SAMPLING)
    finished = run.eval_problem is None and has_pictures(run_dir)
    if "flow" in priors:
        inspect_prior(run, wanted_prior)
        run.flow_sheet_problem = flow_sheet_problem(run_dir)
        finished = finished and run.prior_state == "complete" and run.flow_sheet_problem is None
    run.state = "finished" if finished else "complete"


def has_pictures(run_dir):
    return all(os.path.isfile(os.path.join(run_dir, name)) for name in RUN_PICTURES)


def _flat_prior_settings(meta):
    """A prior.cvae header's (or prior_wanted's) settings, the architecture's flattened."""
    arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    # The dimensions it models come from the codes, not from a setting.
    arch = {k: v for k, v in arch.items() if k not in ("latent", "dims")}
    return {**arch, **{k: meta.get(k) for k in ("epochs", "batch", "lr", "drop", "seed")}}


def inspect_prior(run, wanted):
    """run.prior_state and run.prior_problem of a complete run; a flow prior of its final
    checkpoint with settings other than wanted (prior_wanted) is an error."""
    from cvae.checkpoint import latest_checkpoint
    from cvae.model import model_from_checkpoint

    path = P.prior_path(run.run_dir)
    if not os.path.isfile(path):
        run.prior_state, run.prior_problem = "none", f"no {P.PRIOR_NAME}"
        return
    model, _ = model_from_checkpoint(latest_checkpoint(run.run_dir))
    state, meta = P.prior_state(os.path.dirname(path), model)
    run.prior_state = state
    if state == "stale":
        run.prior_problem = f"its {P.PRIOR_NAME} is the prior of another checkpoint"
        return
    have, want = _flat_prior_settings(meta), _flat_prior_settings(wanted)
    differ = [f"{key} {have.get(key)} (this sweep: {value})" for key, value in want.items()
              if have.get(key) != value]
    if differ:
        raise CvaeError(f"{path} is a flow prior with other settings: {'; '.join(differ)}; "
                        f"choose another --out (or delete it to train the sweep's)")
    if state == "partial":
        run.prior_problem = f"{P.PRIOR_NAME} is partly trained (step {meta.get('step')})"


# ---------------------------------------------------------------- the table


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_rows(table_dir, run_dir, priors=None):
    """The table's rows of a finished run, one per prior (given, else each one its eval.json
    judged, see judged_priors): settings from config.json; the metrics of the generated digits
    from eval.json's by_prior, the others from its top level."""
    from cvae.train import recorded_config

    config = recorded_config(run_dir)
    ev, _ = _read_json(os.path.join(run_dir, EVAL_JSON))
    ev = ev or {}
    arch = config.get("arch") if isinstance(config.get("arch"), dict) else {}
    schedule = config.get("schedule") if isinstance(config.get("schedule"), dict) else {}
    hidden = [arch["h1"], arch["h2"]] if "h1" in arch and "h2" in arch else None
    base = {
        "name": os.path.basename(os.path.normpath(run_dir)),
        "run_dir": os.path.relpath(run_dir, table_dir),
        "latent": arch.get("latent"), "hidden": hidden, "act": arch.get("act"),
        "schedule": schedule.get("name"), "schedule_params": schedule.get("params"),
        "epochs": config.get("epochs"), "digits": config.get("digits"),
        "batch": config.get("batch"), "lr": config.get("lr"), "seed": config.get("seed"),
    }
    rows = []
    for prior in (judged_priors(ev) if priors is None else priors):
        judged = _judged(ev, prior)
        row = {**base, "prior": prior}
        for key in METRICS:
            row[key] = _finite((judged if key in SAMPLE_METRICS else ev).get(key))
        row["ssim_per_digit"] = ev.get("ssim_per_digit")
        row["cond_accuracy_per_digit"] = judged.get("cond_accuracy_per_digit")
        row["diversity_per_digit"] = judged.get("diversity_per_digit")
        row["diversity_test_per_digit"] = ev.get("diversity_test_per_digit")
        row["prior_settings"] = _flow_settings(run_dir, judged) if prior == "flow" else None
        row["eval_seed"] = ev.get("seed")
        row["n_images"] = ev.get("n_images")
        samples = os.path.join(run_dir, FLOW_SAMPLES_NAME if prior == "flow" else SAMPLES_NAME)
        row["samples"] = os.path.relpath(samples, table_dir) if os.path.isfile(samples) else None
        rows.append(row)
    return rows


def _flow_settings(run_dir, judged):
    """A flow row's prior_settings: its training epochs (from prior.cvae) and the sampling
    its evaluation used."""
    from cvae.checkpoint import load_checkpoint

    epochs = None
    try:
        meta, _, _ = load_checkpoint(P.prior_path(run_dir), expected_kind=P.KIND)
        epochs = meta.get("epochs")
    except (CvaeError, OSError):
        pass
    return {"epochs": epochs, **{key: judged.get(key) for key in FLOW_SAMPLING}}


def _sort_key(row):
    def part(value):
        if value is None:
            return (1, "")
        if isinstance(value, list):
            return (0, tuple(value))
        return (0, value)

    keys = ("latent", "hidden", "act", "schedule", "epochs", "digits", "batch", "lr", "seed", "name",
            "prior")
    return tuple(part(row.get(k)) for k in keys)


def _fmt(value, places):
    value = _finite(value)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{places}f}"
    return str(value)


def _md(text):
    return str(text).replace("|", "\\|")


def _setting_text(key, value):
    if value is None:
        return "—"
    if key == "hidden":
        return "×".join(map(str, value))
    if key == "digits":
        return _digits_text(value) if isinstance(value, list) else str(value)
    if key == "lr":
        return f"{value:g}"
    return str(value)


#: (header, row key, decimals, definition) of the metric columns.
METRIC_COLUMNS = (
    ("−ELBO", "neg_elbo", 2, "test-set negative ELBO at β = 1, nats per image (= rec + KL); "
                             "lower is better, the best in bold (on each row of its run)"),
    ("rec", "rec", 2, "reconstruction term: BCE with logits over the 784 continuous pixels, nats"),
    ("KL", "kl", 2, "analytic KL(q(z|x,y) ‖ N(0, I)), nats"),
    ("IWAE NLL", "iwae_nll", 2, "importance-weighted bound on −log p(x|y) with k samples per "
                                "image, nats (tighter than −ELBO)"),
    ("k", "k", 0, "importance samples per image of the IWAE bound"),
    ("SSIM", "ssim", 4, "mean SSIM of the reconstructions (z = μ) against the test digits; "
                        "higher is better"),
    ("cond. acc.", "cond_accuracy", 4, "conditional accuracy: the share of digits generated from "
                                       "the row's prior that a classifier reads as the digit "
                                       "they were generated for"),
    ("FID", "fid", 2, "Fréchet distance in the classifier's feature space between digits "
                      "generated from the row's prior and half of the test digits; lower is "
                      "better"),
    ("FID floor", "fid_test_floor", 2, "the same distance from the other half of the test digits "
                                       "(same size, same digit mix): what real digits score"),
    ("diversity", "diversity", 3, "mean distance in the classifier's feature space between two "
                                  "digits generated from the row's prior for the same digit "
                                  "(averaged over the digits): low is mode collapse"),
    ("test diversity", "diversity_test", 3, "the same of the test digits: what the diversity of "
                                            "real digits is"),
    ("T", "temperature", 2, "temperature of the generated digits: the draws z ~ N(0, T² I) "
                            "(that the flow prior carries on)"),
)
#: Settings that get a column only when the rows differ in them (else one line above the table).
OPTIONAL_SETTINGS = (("digits", "digits"), ("batch", "batch"), ("lr", "lr"), ("seed", "seed"),
                     ("eval seed", "eval_seed"))


def _epochs(n):
    return f"{n} epoch" + ("" if n == 1 else "s")


def _flow_text(settings):
    """A flow row's prior_settings in words: '50 epochs, midpoint, 4 steps, guidance 2'."""
    settings = settings or {}
    parts = [_epochs(settings["epochs"])] if settings.get("epochs") is not None else []
    parts.append(P.sampling_text(settings))
    return ", ".join(p for p in parts if p)


def render_markdown(rows, title):
    rows = list(rows)
    varying = [(h, k) for h, k in OPTIONAL_SETTINGS
               if len({json.dumps(r.get(k)) for r in rows}) > 1]
    common = [(h, k) for h, k in OPTIONAL_SETTINGS if (h, k) not in varying]
    best = min((r["neg_elbo"] for r in rows if r.get("neg_elbo") is not None), default=None)
    flows = {_flow_text(r.get("prior_settings")) for r in rows if r.get("prior") == "flow"}

    lines = [f"# {title}", ""]
    runs = len({r.get("name") for r in rows})
    each = ("one row each" if runs == len(rows) else
            f"one row per run and prior ({len(rows)} rows)")
    lines.append(f"{runs} finished run(s), {each}, sorted by latent size, hidden sizes, "
                 f"activation, schedule and prior. Metrics are those of each run's `eval.json` "
                 f"(`cvae eval`, see the README's Quality metrics); — marks a metric the "
                 f"evaluation did not give.")
    if common and rows:
        shared = ", ".join(f"{h} {_setting_text(k, rows[0].get(k))}" for h, k in common)
        lines.append("")
        lines.append(f"Common to every run: {shared}.")
    lines.append("")
    headers = (["run", "latent", "hidden", "act", "schedule", "epochs"] + [h for h, _ in varying]
               + ["prior"] + [h for h, _, _, _ in METRIC_COLUMNS] + ["samples"])
    lines.append("| " + " | ".join(headers) + " |")
    align = ["---"] + ["---:", "---:", "---", "---", "---:"] + ["---:"] * len(varying) \
        + ["---"] + ["---:"] * len(METRIC_COLUMNS) + ["---"]
    lines.append("|" + "|".join(align) + "|")
    for r in rows:
        cells = [f"`{_md(r['name'])}`"]
        cells += [_md(_setting_text(k, r.get(k))) for k in ("latent", "hidden", "act", "schedule", "epochs")]
        cells += [_md(_setting_text(k, r.get(k))) for _, k in varying]
        prior = _setting_text("prior", r.get("prior"))
        if r.get("prior") == "flow" and len(flows) > 1 and _flow_text(r.get("prior_settings")):
            prior += f" ({_flow_text(r.get('prior_settings'))})"
        cells.append(_md(prior))
        for _, key, places, _ in METRIC_COLUMNS:
            text = _fmt(r.get(key), places)
            if key == "neg_elbo" and best is not None and r.get(key) == best:
                text = f"**{text}**"
            cells.append(text)
        sheet = r.get("samples")
        cells.append(f"[{_md(os.path.basename(sheet))}]({sheet.replace(os.sep, '/')})" if sheet else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Columns:")
    lines.append("")
    definitions = [
        ("run", "the run directory (beside this file); its `config.json` holds every setting"),
        ("latent", "latent size"),
        ("hidden", "hidden layer sizes h1 × h2 (encoder 794 → h1 → h2, decoder the mirror)"),
        ("act", "hidden activation"),
        ("schedule", "β / learning-rate schedule (`cvae train --help`)"),
        ("epochs", "training epochs"),
    ]
    definitions += [(h, {"digits": "digits trained and evaluated on", "batch": "minibatch size",
                         "lr": "base learning rate", "seed": "training seed",
                         "eval seed": "noise seed of the evaluation"}[h]) for h, _ in varying]
    flow = (f" ({next(iter(flows))})" if len(flows) == 1 and next(iter(flows)) else "")
    definitions.append(("prior", "the prior the generated digits of cond. acc., FID, diversity "
                                 "and samples are drawn from: gaussian, z ~ N(0, T² I), the "
                                 "CVAE's own; flow, the run's flow-matching prior (`prior.cvae`, "
                                 f"`cvae prior train`){flow}, carrying those draws to where the "
                                 "codes are. The other metrics are the run's, the same on each "
                                 "of its rows"))
    definitions += [(h, d) for h, _, _, d in METRIC_COLUMNS]
    definitions.append(("samples", "the run's digit sheet from the row's prior: 10 samples per "
                                   "digit, temperature 1, one row per digit (PGM, with a JSON "
                                   "sidecar): `samples.pgm` (gaussian) or `samples-flow.pgm` "
                                   "(flow, the same draws carried by the flow)"))
    lines += [f"- **{h}**: {d}" for h, d in definitions]
    return "\n".join(lines) + "\n"


def write_table(table_dir, rows, title):
    """sweep.jsonl and sweep.md in table_dir, each written atomically."""
    from cvae.atomic import write_text_atomic

    rows = sorted(rows, key=_sort_key)
    jsonl = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
    md = render_markdown(rows, title)
    paths = (os.path.join(table_dir, SWEEP_JSONL), os.path.join(table_dir, SWEEP_MD))
    for path, text in zip(paths, (jsonl, md)):
        try:
            write_text_atomic(path, text)
        except OSError as e:
            raise CvaeError(f"cannot write {path}: {e.strerror or e}") from None
    return paths


# ---------------------------------------------------------------- cvae sweep --collect


def collect(directory):
    """(rows of the finished runs, [(run_dir, why unfinished)]) of the subdirectories of
    directory that hold a run (config.json or a checkpoint)."""
    from cvae.checkpoint import list_checkpoints
    from cvae.train import CONFIG_NAME, read_metrics, recorded_config

    try:
        names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise CvaeError(f"cannot read --collect {directory}: {e.strerror or e}") from None
    rows, unfinished = [], []
    for name in names:
        run_dir = os.path.join(directory, name)
        has_config = os.path.isfile(os.path.join(run_dir, CONFIG_NAME))
        try:
            checkpoints = list_checkpoints(run_dir)
        except CvaeError:
            checkpoints = []
        if not has_config and not checkpoints:
            continue  # not a run directory
        why = None
        config = recorded_config(run_dir)
        if not has_config or not config:
            why = "no readable config.json"
        else:
            try:
                state, plan = training_state(run_dir)
            except CvaeError as e:
                state, plan, why = None, None, str(e)
            if why is None:
                epochs = config.get("epochs")
                if state == "none":  # results kept without checkpoints: go by the metrics
                    done = read_metrics(run_dir)
                    if not isinstance(epochs, int) or not done or done[-1]["epoch"] < epochs:
                        why = "training not complete"
                elif state == "partial":
                    why = f"training not complete (epoch {plan.epoch} of {plan.epochs})"
                else:
                    epochs = plan.epochs
                if why is None:
                    why = eval_problem(run_dir, epochs if isinstance(epochs, int) else 0)
        if why is None:
            rows += read_rows(directory, run_dir)
        else:
            unfinished.append((run_dir, why))
    return rows, unfinished


def cmd_collect(args):
    directory = args.collect
    if not os.path.exists(directory):
        raise CvaeError(f"--collect {directory}: no such directory")
    if not os.path.isdir(directory):
        raise CvaeError(f"--collect {directory} is not a directory")
    rows, unfinished = collect(directory)
    if not rows:
        extra = f" ({len(unfinished)} unfinished)" if unfinished else ""
        raise CvaeError(f"--collect {directory}: no finished runs in it (a subdirectory with "
                        f"config.json, a complete training and eval.json){extra}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CvaeError(f"cannot write the table into {directory}: not writable")
    for run_dir, why in unfinished:
        print(f"cvae: {run_dir}: unfinished ({why}): not in the table", file=sys.stderr, flush=True)
    jsonl, md = write_table(directory, rows, f"cvae sweep: {os.path.basename(os.path.abspath(directory))}")
    if args.json:
        for row in sorted(rows, key=_sort_key):
            print(json.dumps(row), flush=True)
    elif not args.quiet:
        runs = len({r["name"] for r in rows})
        each = "" if runs == len(rows) else f" ({len(rows)} rows: one per run and prior)"
        print(f"{runs} finished run(s){each} -> {md}, {jsonl}", flush=True)
    return 0


# ---------------------------------------------------------------- cvae sweep


def _install_signals():
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise Interrupted(signum)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _summary(rows):
    """One run's figures in a line: the shared ones, then each prior's."""
    parts = []
    row = rows[0]
    for label, key, places in (("−ELBO", "neg_elbo", 2), ("IWAE NLL", "iwae_nll", 2),
                               ("SSIM", "ssim", 4)):
        if row.get(key) is not None:
            parts.append(f"{label} {_fmt(row[key], places)}")
    for r in rows:
        what = [r["prior"]] if len(rows) > 1 else []
        if r.get("temperature") is not None:
            what.append(f"T = {r['temperature']:g}")
        suffix = f" ({', '.join(what)})" if what else ""
        for label, key, places in (("cond. acc.", "cond_accuracy", 4), ("FID", "fid", 2)):
            if r.get(key) is not None:
                parts.append(f"{label}{suffix} {_fmt(r[key], places)}")
    return ", ".join(parts)


def _check_out(out):
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise CvaeError(f"--out {out} exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise CvaeError(f"--out {out} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CvaeError(f"cannot create --out {out}: {parent} is not a writable directory")


def _commands(args, runs):
    """One shell line per run: train (or resume, when the run has a checkpoint), then with the
    flow prior asked train its prior (or resume it, when the run has prior.cvae), then eval."""
    common = []  # options the resume, the prior and the evaluation take too
    for name in ("threads", "data"):
        if getattr(args, name) is not None:
            common += [f"--{name}", str(getattr(args, name))]
    priors = sweep_priors(args)
    ev = [f"--{name}={getattr(args, name)}" for name in EVAL_OPTIONS if getattr(args, name) is not None]
    ev.append(f"--prior={eval_prior_choice(priors)}")
    lines = []
    for run in runs:
        d = shlex.quote(run.run_dir)
        train = " ".join(shlex.quote(o) for o in run.train_options(args))
        both = "".join(" " + shlex.quote(o) for o in common)
        evs = "".join(" " + shlex.quote(o) for o in ["--seed", str(run.plan.seed), *ev])
        prior = ""
        if "flow" in priors:
            fresh = [] if args.prior_epochs is None else ["--epochs", str(args.prior_epochs)]
            fresh = "".join(" " + shlex.quote(o) for o in fresh)
            prior = (f"if [ -e {d}/{P.PRIOR_NAME} ]; then cvae prior train --checkpoint {d} "
                     f"--resume{both} --quiet; else cvae prior train --checkpoint {d}{fresh}{both} "
                     f"--quiet; fi && ")
        lines.append(f"if [ -e {d}/last.cvae ]; then cvae train --resume {d}{both} --quiet; "
                     f"else cvae train --out {d} {train} --quiet; fi && {prior}"
                     f"cvae eval --checkpoint {d}{evs}{both} --json")
    return lines


def cmd_sweep(args):
    given = [name for name in GRID + SHARED + EVAL_OPTIONS + PRIOR_OPTIONS
             if getattr(args, name) is not None]
    if args.commands:
        given.append("commands")
    if args.collect is not None:
        if args.out is not None:
            raise CvaeError("--collect DIR writes its table into DIR: leave out --out")
        if given:
            raise CvaeError(f"--collect builds the table from finished runs and takes no "
                            f"training options (got --{given[0].replace('_', '-')})")
        return cmd_collect(args)
    if args.out is None:
        raise CvaeError("give --out DIR (where the runs go), or --collect DIR to tabulate "
                        "finished runs (see 'cvae sweep --help')")
    priors = sweep_priors(args)
    if args.prior_epochs is not None and "flow" not in priors:
        raise CvaeError("--prior-epochs is the flow prior's training: add flow to --prior "
                        "(e.g. --prior gaussian,flow)")
    from cvae import cli
    from cvae import train as T

    runs = plan_runs(args)
    if args.commands:
        for line in _commands(args, runs):
            print(line)
        return 0
    threads = args.threads
    if threads is None:
        from cvae.kernels import default_threads

        threads = default_threads()
    for run in runs:
        run.train_args.threads = threads
    seed = runs[0].plan.seed
    ev_kwargs = eval_kwargs(args, seed)
    ev_kwargs["threads"] = threads
    ev_kwargs["prior"] = eval_prior_choice(priors)
    wanted = eval_wanted(args, seed)

    out = args.out
    _check_out(out)
    for run in runs:
        inspect_run(run, wanted, priors, prior_wanted(args, run.plan))
    say = cli._say(args)
    todo = [r for r in runs if r.state != "finished"]
    data_dir = None
    if todo:
        data_dir, _ = cli.ensure_data(runs[0].train_args)
        # Fail on missing or unreadable data now, before any run directory is made.
        for digits in {r.plan.digits for r in todo}:
            T.load_datasets(data_dir, digits)
    ev_kwargs["data"] = data_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CvaeError(f"cannot create --out {out}: {e.strerror or e}") from None

    n = len(runs)
    old = _install_signals()
    current = None
    try:
        for i, run in enumerate(runs, 1):
            current = run
            tag = f"[{i}/{n}] {run.name}"
            if run.state == "finished":
                say(f"{tag}: skipped (finished)")
                status = "skipped"
            else:
                start = time.perf_counter()
                code, status = _do_run(run, args, tag, say, threads, data_dir, ev_kwargs, priors)
                if code:
                    print(f"cvae: sweep stopped in run {run.name} ({i} of {n}); run the same "
                          f"'cvae sweep' command again to continue (finished runs are skipped, "
                          f"this one resumes)", file=sys.stderr, flush=True)
                    return code
                done = "flow prior trained" if status == "prior" else status
                say(f"{tag}: {done} in {time.perf_counter() - start:.1f} s: "
                    f"{_summary(read_rows(out, run.run_dir, priors))}")
            if args.json:
                for row in read_rows(out, run.run_dir, priors):
                    print(json.dumps({**row, "status": status}), flush=True)
        current = None
        rows = [row for r in runs for row in read_rows(out, r.run_dir, priors)]
        jsonl, md = write_table(out, rows, f"cvae sweep: {os.path.basename(os.path.abspath(out))}")
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        where = f" in run {current.name}" if current is not None else ""
        print(f"cvae: {name}: sweep stopped{where}; run the same 'cvae sweep' command again to "
              f"continue (finished runs are skipped)", file=sys.stderr, flush=True)
        return T.EXIT_SIGNAL.get(e.signum, 130)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    table = "" if len(priors) == 1 else f", {len(rows)} rows"
    say(f"table of {n} run(s){table} -> {md}, {jsonl}")
    return 0


def _do_run(run, args, tag, say, threads, data_dir, ev_kwargs, priors=DEFAULT_PRIORS):
    """Train / resume / finish one run (with the flow prior asked, its prior too); (exit code,
    status). A non-zero code: interrupted."""
    from cvae import cli
    from cvae import train as T
    from cvae.evaluate import run_eval
    from cvae.train import CONFIG_NAME, METRICS_NAME

    reporter = T.Reporter() if (args.json or args.quiet) else T.RichReporter()
    result = None
    if run.state in ("new", "restart"):
        if run.state == "restart":
            # This run (same settings) was stopped before its first checkpoint: start it again.
            for name in (CONFIG_NAME, METRICS_NAME):
                try:
                    os.unlink(os.path.join(run.run_dir, name))
                except FileNotFoundError:
                    pass
        say(f"{tag}: training ({run.plan.epochs} epochs)")
        trainer = cli.start_run(run.train_args, run.run_dir, reporter,
                                config_extra={"sweep_argv": list(getattr(args, "argv", []) or [])})
        status = "trained"
    else:
        trainer = T.resume_trainer(run.run_dir, threads, data_dir, reporter)
        if run.state == "partial":
            p = trainer.plan
            say(f"{tag}: resuming at epoch {p.epoch + 1} of {p.epochs}")
            status = "resumed"
        else:
            what = next((why for why in (run.prior_problem, run.eval_problem,
                                         run.flow_sheet_problem) if why is not None),
                        f"no {SAMPLES_NAME}")
            prior_work = run.prior_state in ("none", "stale", "partial")
            doing = "evaluating" if run.eval_problem is not None else "writing its images"
            say(f"{tag}: trained; {what}" + ("" if prior_work else f": {doing}"))
            status = "prior" if prior_work else "evaluated"
    if run.state != "complete":
        result = trainer.run()
        if result.exit_code:
            return result.exit_code, status
        if result.status != "complete":
            raise CvaeError(f"{run.run_dir}: training stopped early ({result.status})")
    flow, prior_changed = None, False
    if "flow" in priors:
        code, prior_changed, flow = _flow_prior(run, args, tag, say, threads, trainer)
        if code:
            return code, status
    if result is not None or not has_pictures(run.run_dir):
        T.write_images(trainer)
    if flow is not None and (result is not None or prior_changed
                             or flow_sheet_problem(run.run_dir) is not None):
        _write_flow_sheet(run.run_dir, trainer.plan, *flow)
    if result is not None or prior_changed or run.eval_problem is not None:
        run_eval(run.run_dir, progress=not (args.json or args.quiet), **ev_kwargs)
    return 0, status


def _flow_prior(run, args, tag, say, threads, trainer):
    """Make sure the run's flow prior is complete for its final checkpoint: train it (a new
    one, or in place of the prior of another checkpoint) or resume it, as 'cvae prior train'
    would. (exit code, whether prior.cvae changed, (model, FlowSampler) or None when stopped)."""
    from cvae import train as T
    from cvae.checkpoint import latest_checkpoint
    from cvae.sample import open_model

    final = latest_checkpoint(run.run_dir)
    # The CVAE as 'cvae prior train' opens it: its digest is the checkpoint's.
    model, _ = open_model(final, argparse.Namespace(threads=threads))
    state, meta = P.prior_state(run.run_dir, model)
    if state != "complete":
        settings = prior_settings(args)
        if state == "partial":
            say(f"{tag}: flow prior: resuming at step {meta.get('step')} (epoch "
                f"{len(meta.get('epoch_losses') or []) + 1} of {meta.get('epochs')})")
        else:
            instead = (f"in place of its {P.PRIOR_NAME} of another checkpoint, "
                       if state == "stale" else "")
            say(f"{tag}: flow prior: training {instead}({_epochs(settings['epochs'])})")
        mode = "quiet" if (args.json or args.quiet) else "rich"
        status, prior_trainer, _, _ = P.complete_run_prior(
            run.run_dir, model, trainer.train_set, threads, os.path.basename(final), settings,
            mode=mode, replace_stale=True)
        if status != "complete":
            return T.EXIT_SIGNAL.get(prior_trainer.stop_signal, 130), True, None
    sampler = P.open_prior("flow", run.run_dir, model, threads, **FLOW_SAMPLING)
    return 0, state != "complete", (model, sampler)


def _write_flow_sheet(run_dir, plan, model, sampler):
    """RUN/samples-flow.pgm as sample.write_run_images writes it: the flow prior's digit sheet,
    the same draws as samples.pgm carried by the flow."""
    from cvae.sample import write_flow_samples

    write_flow_samples(model, run_dir, plan.seed, plan.digits, sampler)


# ---------------------------------------------------------------- parser


def register(subparsers):
    from cvae import cli
    from cvae.model import ACTIVATIONS, VARIANTS
    from cvae.schedule import SCHEDULES

    p = subparsers.add_parser(
        "sweep", formatter_class=cli.Formatter,
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
    grid.add_argument("--latent", type=_list_type(_latent_item, "128,256"), metavar="L1,L2,...",
                      default=None, help="latent sizes (default: the variant's)")
    grid.add_argument("--hidden", type=_list_type(_hidden_item, "640x320,512x256"),
                      metavar="H1xH2,...", default=None,
                      help="hidden layer sizes, each pair written H1xH2, pairs separated by commas, "
                           "e.g. 640x320,512x256 (default: the variant's)")
    grid.add_argument("--act", type=_list_type(_choice_item(ACTIVATIONS, "an activation"), "elu,relu"),
                      metavar="A1,A2", default=None,
                      help=f"hidden activations, of {','.join(ACTIVATIONS)} (default: elu)")
    grid.add_argument("--schedule", type=_list_type(_choice_item(tuple(SCHEDULES), "a schedule"),
                                                    "progressive,constant"),
                      metavar="S1,S2", default=None,
                      help=f"β / learning-rate schedules, of {','.join(SCHEDULES)} (see 'cvae train "
                           f"--help') (default: progressive)")
    shared = p.add_argument_group("shared by every run (as in 'cvae train')")
    shared.add_argument("--variant", choices=tuple(VARIANTS), default=None,
                        help="base sizes and digits, overridden by the grid (default: full)")
    shared.add_argument("--digits", type=cli.digits_type, default=None,
                        help="digits to train on, e.g. 0-9 or 0,1 (default: the variant's)")
    shared.add_argument("--epochs", type=cli.positive_int, default=None, help="epochs per run (default: 30)")
    shared.add_argument("--batch", type=cli.positive_int, default=None, help="minibatch size (default: 64)")
    shared.add_argument("--lr", type=cli.positive_float, default=None, help="base learning rate (default: 1e-3)")
    shared.add_argument("--seed", type=cli.non_negative_int, default=None,
                        help="training seed, also the evaluation's noise seed (default: 0)")
    shared.add_argument("--threads", type=cli.positive_int, default=None,
                        help="OpenMP threads (default: the CPUs available to this process)")
    shared.add_argument("--data", metavar="DIR", default=None,
                        help="MNIST directory (default: $CVAE_DATA, else the cache, fetched when empty)")
    def eval_default(name):
        return f"(default: cvae eval's, {EVAL_DEFAULTS[name]:g})"

    ev = p.add_argument_group("evaluation (as in 'cvae eval'; its defaults unless given)")
    ev.add_argument("--k", type=cli.positive_int, default=None,
                    help=f"importance samples per image of the IWAE bound {eval_default('k')}")
    ev.add_argument("--samples", type=cli.positive_int, default=None,
                    help=f"generated digits per digit for the conditional accuracy and FID "
                         f"{eval_default('samples')}")
    ev.add_argument("--temperature", type=cli.non_negative_float, default=None,
                    help=f"temperature of those generated digits {eval_default('temperature')}")
    ev.add_argument("--classifier", metavar="FILE", default=None,
                    help="digit classifier for the conditional accuracy and FID (default: cvae "
                         "eval's: the shipped one, for the MNIST test set)")
    pr = p.add_argument_group("prior (of the generated digits that cond. acc., FID and diversity judge)")
    pr.add_argument("--prior", type=_list_type(_choice_item(PRIORS, "a prior"), "gaussian,flow"),
                    metavar="P1,P2", default=None,
                    help="priors, each one row per run in the table: gaussian (z ~ N(0, T² I), "
                         "the CVAE's own) and flow (the run's flow-matching prior, trained after "
                         "the CVAE as 'cvae prior train' trains it; its digit sheet is "
                         "samples-flow.pgm). The CVAE is trained once either way (default: "
                         "gaussian)")
    pr.add_argument("--prior-epochs", type=cli.positive_int, default=None, metavar="N",
                    help=f"epochs of each run's flow prior (default: cvae prior train's, "
                         f"{P.DEFAULT_EPOCHS})")
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
