"""`cvae sweep`: train every combination of a few settings, evaluate each, write one table.

    cvae sweep --latent 128,256 [--hidden 640x320,512x256] [--act elu,relu]
               [--schedule progressive,constant] --epochs E --out DIR

Every combination is one run directory DIR/<name>, named after the settings that make up the
grid, always in the same form: ``latent128-h640x320-elu-progressive``. The other settings
(--variant, --digits, --epochs, --batch, --lr, --seed) are shared by every run. Each run is
trained in-process exactly as `cvae train` trains it (workflows.start_run), then finished as
`cvae train` finishes a run (workflows.finish_run: its flow prior when asked, its images, and
its evaluation, which writes DIR/<name>/eval.json). The table of all the
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
prior. A run with a partial checkpoint is resumed (workflows.resume_run); a complete run gets
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

import itertools
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from cvae import rundir as R
from cvae.atomic import write_text_atomic
from cvae.catalogue import EVAL, SAMPLE_METRICS, SWEEP_COLUMNS
from cvae.data import digits_text
from cvae.errors import CvaeError
from cvae.evaluate import DEFAULT_K, DEFAULT_SAMPLES, DEFAULT_TEMPERATURE
from cvae.fetch import ensure_data
from cvae.kernels import default_threads
from cvae.model import ConvArch
from cvae.prior import (DEFAULT_BATCH, DEFAULT_DROP, DEFAULT_EPOCHS, DEFAULT_GUIDANCE,
                        DEFAULT_LR, DEFAULT_METHOD, DEFAULT_STEPS, PRIORS as ALL_PRIORS,
                        PriorArch, sampling_text)
from cvae.signals import Interrupted, interrupt_on_signals, signal_name
from cvae.signals import exit_code as signal_exit_code
from cvae.kernels import resolve_precision
from cvae.train import DEFAULT_PRECISION, DEFAULT_VARIANT, Reporter, RichReporter, make_plan
from cvae.workflows import Finish, finish_run, load_datasets, resume_run, start_run

SWEEP_MD = "sweep.md"
SWEEP_JSONL = "sweep.jsonl"

#: The grid options, in the order that makes up a run's name.
GRID = ("variant", "latent", "hidden", "act", "schedule")
#: Options shared by every run of a sweep (also training options --collect refuses).
SHARED = ("digits", "epochs", "batch", "lr", "seed", "threads", "data", "precision")
EVAL_OPTIONS = ("k", "samples", "temperature", "classifier")
#: The prior axis: which priors generate the judged digits (each one row of the table), and
#: the flow prior's training.
PRIOR_OPTIONS = ("prior", "prior_epochs")
#: The sweep's priors, in the table's order of a run's rows.
PRIORS = tuple(sorted(ALL_PRIORS))
DEFAULT_PRIORS = ("gaussian",)
#: The flow prior's seed: cvae prior train's default (train_prior's), whatever the run's.
PRIOR_SEED = 0
#: The flow's sampling in the sweep's evaluations (cvae eval's defaults).
FLOW_SAMPLING = {"steps": DEFAULT_STEPS, "method": DEFAULT_METHOD, "guidance": DEFAULT_GUIDANCE}
#: cvae eval's defaults of the options a sweep passes on.
EVAL_DEFAULTS = {"k": DEFAULT_K, "samples": DEFAULT_SAMPLES, "temperature": DEFAULT_TEMPERATURE}
#: Metrics copied from eval.json into the table (None when absent), in the row's order; those
#: of SAMPLE_METRICS are the prior's (eval.json's by_prior), the others the run's.
METRICS = SWEEP_COLUMNS


@dataclass
class Sweep:
    """A sweep's settings, as `cvae sweep` takes them: None means 'the default'."""

    out: str = None
    variant: tuple = None       # grid: each a tuple of values, or None (the default)
    latent: tuple = None        # (None: the variant's)
    hidden: tuple = None        # (H1, H2) pairs, or (H,) for conv
    act: tuple = None
    schedule: tuple = None
    digits: tuple = None
    epochs: int = None
    batch: int = None
    lr: float = None
    seed: int = None
    threads: int = None
    data: str = None
    precision: str = None       # of the training (None: cvae train's default)
    k: int = None               # evaluation
    samples: int = None
    temperature: float = None
    classifier: str = None
    prior: tuple = None         # the prior axis
    prior_epochs: int = None
    mode: str = "rich"          # rich, json (a row per line on stdout) or quiet
    argv: list = field(default_factory=list)

    def given(self):
        """The names of the settings given (not None)."""
        return [name for name in GRID + SHARED + EVAL_OPTIONS + PRIOR_OPTIONS
                if getattr(self, name) is not None]


# ---------------------------------------------------------------- the runs of a sweep


class Run:
    """One combination: its name, its run directory and its plan."""

    def __init__(self, name, run_dir, plan, variant=DEFAULT_VARIANT):
        self.name = name
        self.run_dir = run_dir
        self.plan = plan
        self.variant = variant
        self.state = None      # "new", "restart", "partial", "complete", "finished"
        self.eval_problem = None
        # of a complete run with the flow prior asked: "none", "stale", "partial", "complete"
        self.prior_state = None
        self.prior_problem = None
        self.flow_sheet_problem = None

    def train_options(self, sweep):
        """The `cvae train` options (without --out) that start this run."""
        plan, arch = self.plan, self.plan.arch
        if isinstance(arch, ConvArch):
            opts = ["--variant", self.variant, "--channels", ",".join(map(str, arch.channels)),
                    "--hidden", str(arch.hidden)]
        else:  # as before conv existed: the sizes and digits make the variant
            opts = ["--hidden", f"{arch.h1},{arch.h2}"]
        opts += ["--latent", str(arch.latent), "--act", arch.act, "--schedule", plan.schedule.name,
                "--digits", digits_text(plan.digits), "--epochs", str(plan.epochs),
                "--batch", str(plan.batch), "--lr", repr(plan.lr), "--seed", str(plan.seed)]
        if sweep.threads is not None:
            opts += ["--threads", str(sweep.threads)]
        if sweep.data is not None:
            opts += ["--data", sweep.data]
        if sweep.precision is not None:
            opts += ["--precision", sweep.precision]
        # The sweep trains a run's flow prior itself, with its own settings (--prior-epochs),
        # and only when --prior asks for it.
        return opts + ["--prior", "gaussian"]


def run_name(plan):
    """latent128-h640x320-elu-progressive; a conv run conv-c32x64-latent128-h512-elu-progressive
    (the MLP's names are those of sweeps from before conv)."""
    a = plan.arch
    if isinstance(a, ConvArch):
        c1, c2 = a.channels
        return f"conv-c{c1}x{c2}-latent{a.latent}-h{a.hidden}-{a.act}-{plan.schedule.name}"
    return f"latent{a.latent}-h{a.h1}x{a.h2}-{a.act}-{plan.schedule.name}"


def plan_runs(sweep):
    """Every combination of the grid options as a Run (in the grid's order)."""
    lists = [getattr(sweep, name) or (None,) for name in GRID]
    precision, _ = resolve_precision(sweep.precision or DEFAULT_PRECISION)
    runs, names = [], set()
    for variant, latent, hidden, act, schedule in itertools.product(*lists):
        variant = variant or DEFAULT_VARIANT
        plan = make_plan(variant=variant, hidden=hidden, latent=latent,
                         act=act, digits=sweep.digits, schedule=schedule, epochs=sweep.epochs,
                         seed=sweep.seed, batch=sweep.batch, lr=sweep.lr, precision=precision)
        name = run_name(plan)
        if name in names:  # distinct list values always give distinct names; never clobber
            raise CvaeError(f"two combinations of the sweep are the same run ({name})")
        names.add(name)
        runs.append(Run(name, os.path.join(sweep.out, name), plan, variant))
    return runs


def eval_settings(sweep):
    """k, samples and temperature: as given, else cvae eval's defaults."""
    return {name: default if getattr(sweep, name) is None else getattr(sweep, name)
            for name, default in EVAL_DEFAULTS.items()}


def eval_wanted(sweep, seed):
    """{eval.json key: value} an existing evaluation must have to be reused (the classifier:
    None for the default one)."""
    return {"seed": seed, **eval_settings(sweep), "classifier": sweep.classifier}


def sweep_priors(sweep):
    """The priors asked (--prior), in the table's order."""
    return tuple(p for p in PRIORS if p in (sweep.prior or DEFAULT_PRIORS))


def eval_prior_choice(priors):
    """run_eval's prior for these priors: 'both', or the one."""
    return "both" if len(priors) > 1 else priors[0]


def prior_settings(sweep):
    """train_run_prior's settings of a run's flow prior: --prior-epochs and cvae prior train's
    seed (the others are its defaults too, as 'cvae train --prior flow' trains it)."""
    return {"epochs": DEFAULT_EPOCHS if sweep.prior_epochs is None else sweep.prior_epochs,
            "seed": PRIOR_SEED}


def prior_wanted(sweep, plan):
    """{prior.cvae header key: value} of the flow prior the sweep trains for a run."""
    return {"arch": PriorArch(latent=plan.arch.latent).to_json(), "batch": DEFAULT_BATCH,
            "lr": DEFAULT_LR, "drop": DEFAULT_DROP, **prior_settings(sweep)}


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
    if isinstance(value, dict) and ({"h1", "h2", "latent"} <= set(value)
                                    or value.get("type") == "conv"):
        return R.arch_text(value)
    if isinstance(value, dict) and "name" in value:
        return value["name"] + (" " + ",".join(f"{k}={v:g}" for k, v in value.get("params", {}).items())
                                if value.get("params") else "")
    if isinstance(value, list):
        return digits_text(value) if all(isinstance(v, int) for v in value) else str(value)
    return str(value)


def inspect_run(run, wanted_eval, priors=DEFAULT_PRIORS, wanted_prior=None):
    """Set run.state (and run.eval_problem, and with the flow prior asked run.prior_state,
    run.prior_problem and run.flow_sheet_problem); a directory holding another run, or a
    flow prior of this run with other settings than wanted_prior, is an error."""
    run_dir = run.run_dir
    want = run.plan.to_config()
    if not os.path.exists(run_dir):
        run.state = "new"
        return
    if not os.path.isdir(run_dir):
        raise CvaeError(f"{run_dir} exists and is not a directory: choose another --out")
    state, plan = R.training_state(run_dir)
    if state == "none":
        if not any(os.path.exists(os.path.join(run_dir, n)) for n in (R.CONFIG, R.METRICS)):
            run.state = "new"
            return
        differ = config_differences(R.read_config(run_dir), want)
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
    run.eval_problem = R.eval_problem(run_dir, plan.epochs, wanted_eval, priors, FLOW_SAMPLING)
    finished = run.eval_problem is None and R.has_pictures(run_dir)
    if "flow" in priors:
        inspect_prior(run, wanted_prior)
        run.flow_sheet_problem = R.flow_sheet_problem(run_dir)
        finished = finished and run.prior_state == "complete" and run.flow_sheet_problem is None
    run.state = "finished" if finished else "complete"


def _flat_prior_settings(meta):
    """A prior.cvae header's (or prior_wanted's) settings, the architecture's flattened."""
    arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    # The dimensions it models come from the codes, not from a setting.
    arch = {k: v for k, v in arch.items() if k not in ("latent", "dims")}
    return {**arch, **{k: meta.get(k) for k in ("epochs", "batch", "lr", "drop", "seed")}}


def inspect_prior(run, wanted):
    """run.prior_state and run.prior_problem of a complete run; a flow prior of its final
    checkpoint with settings other than wanted (prior_wanted) is an error."""
    path = R.prior_path(run.run_dir)
    if not os.path.isfile(path):
        run.prior_state, run.prior_problem = "none", f"no {R.PRIOR}"
        return
    model, _ = R.open_model(R.latest_checkpoint(run.run_dir), threads=1, batch=64)
    state, meta = R.prior_state(run.run_dir, model)
    run.prior_state = state
    if state == "stale":
        run.prior_problem = f"its {R.PRIOR} is the prior of another checkpoint"
        return
    have, want = _flat_prior_settings(meta), _flat_prior_settings(wanted)
    differ = [f"{key} {have.get(key)} (this sweep: {value})" for key, value in want.items()
              if have.get(key) != value]
    if differ:
        raise CvaeError(f"{path} is a flow prior with other settings: {'; '.join(differ)}; "
                        f"choose another --out (or delete it to train the sweep's)")
    if state == "partial":
        run.prior_problem = f"{R.PRIOR} is partly trained (step {meta.get('step')})"


# ---------------------------------------------------------------- the table


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_rows(table_dir, run_dir, priors=None):
    """The table's rows of a finished run, one per prior (given, else each one its eval.json
    judged, see judged_priors): settings from config.json; the metrics of the generated digits
    from eval.json's by_prior, the others from its top level."""
    config = R.read_config(run_dir)
    ev, _ = R.read_eval(run_dir)
    ev = ev or {"by_prior": {"gaussian": {}}}
    arch = config.get("arch") if isinstance(config.get("arch"), dict) else {}
    schedule = config.get("schedule") if isinstance(config.get("schedule"), dict) else {}
    if arch.get("type") == "conv":
        hidden = [arch["hidden"]] if "hidden" in arch else None
        channels = arch.get("channels")
        model = "conv " + "×".join(map(str, channels)) if isinstance(channels, list) else "conv"
    else:
        hidden = [arch["h1"], arch["h2"]] if "h1" in arch and "h2" in arch else None
        model = "MLP"
    base = {
        "name": os.path.basename(os.path.normpath(run_dir)),
        "run_dir": os.path.relpath(run_dir, table_dir),
        "model": model, "latent": arch.get("latent"), "hidden": hidden, "act": arch.get("act"),
        "schedule": schedule.get("name"), "schedule_params": schedule.get("params"),
        "epochs": config.get("epochs"), "digits": config.get("digits"),
        "batch": config.get("batch"), "lr": config.get("lr"), "seed": config.get("seed"),
    }
    rows = []
    for prior in (list(ev["by_prior"]) if priors is None else priors):
        judged = ev["by_prior"].get(prior) or {}
        row = {**base, "prior": prior}
        for key in METRICS:
            row[key] = _finite((judged if key in SAMPLE_METRICS else ev).get(key))
        row["ssim_per_digit"] = ev.get("ssim_per_digit")
        row["cond_accuracy_per_digit"] = judged.get("cond_accuracy_per_digit")
        row["diversity_per_digit"] = judged.get("diversity_per_digit")
        row["diversity_test_per_digit"] = ev.get("diversity_test_per_digit")
        row["prior_settings"] = _flow_settings(run_dir, judged) if prior == "flow" else None
        if judged.get("cas") is not None:  # only an evaluation with --cas has them
            row.update(cas=_finite(judged["cas"]), cas_per_digit=judged.get("cas_per_digit"),
                       cas_real=_finite(ev.get("cas_real")))
        row["eval_seed"] = ev.get("seed")
        row["n_images"] = ev.get("n_images")
        samples = os.path.join(run_dir, R.FLOW_SAMPLES if prior == "flow" else R.SAMPLES)
        row["samples"] = os.path.relpath(samples, table_dir) if os.path.isfile(samples) else None
        rows.append(row)
    return rows


def _flow_settings(run_dir, judged):
    """A flow row's prior_settings: its training epochs (from prior.cvae) and the sampling
    its evaluation used."""
    epochs = None
    try:
        summary = R.prior_summary(run_dir)
        epochs = summary[0].epochs if summary else None
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

    keys = ("model", "latent", "hidden", "act", "schedule", "epochs", "digits", "batch", "lr", "seed",
            "name", "prior")
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
        return digits_text(value) if isinstance(value, list) else str(value)
    if key == "lr":
        return f"{value:g}"
    return str(value)


#: (header, row key, decimals, definition) of the metric columns, from the catalogue.
METRIC_COLUMNS = tuple((EVAL[key].header, key, EVAL[key].places, EVAL[key].definition
                       + (" (of the row's prior)" if key in SAMPLE_METRICS else ""))
                       for key in METRICS)
#: Settings that get a column only when the rows differ in them (else one line above the table).
OPTIONAL_SETTINGS = (("model", "model"), ("digits", "digits"), ("batch", "batch"), ("lr", "lr"), ("seed", "seed"),
                     ("eval seed", "eval_seed"))


def _epochs(n):
    return f"{n} epoch" + ("" if n == 1 else "s")


def _flow_text(settings):
    """A flow row's prior_settings in words: '50 epochs, midpoint, 4 steps, guidance 2'."""
    settings = settings or {}
    parts = [_epochs(settings["epochs"])] if settings.get("epochs") is not None else []
    parts.append(sampling_text(settings))
    return ", ".join(p for p in parts if p)


#: The columns of `cvae eval --cas`'s figures: in a table only when a row has them.
CAS_COLUMNS = tuple((EVAL[key].header, key, EVAL[key].places, EVAL[key].definition
                     + (" (of the row's prior; `cvae eval --cas`)" if key == "cas" else ""))
                    for key in ("cas", "cas_real"))


def render_markdown(rows, title):
    rows = list(rows)
    metric_columns = METRIC_COLUMNS + (CAS_COLUMNS if any(r.get("cas") is not None
                                                          for r in rows) else ())
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
               + ["prior"] + [h for h, _, _, _ in metric_columns] + ["samples"])
    lines.append("| " + " | ".join(headers) + " |")
    align = ["---"] + ["---:", "---:", "---", "---", "---:"] + ["---:"] * len(varying) \
        + ["---"] + ["---:"] * len(metric_columns) + ["---"]
    lines.append("|" + "|".join(align) + "|")
    for r in rows:
        cells = [f"`{_md(r['name'])}`"]
        cells += [_md(_setting_text(k, r.get(k))) for k in ("latent", "hidden", "act", "schedule", "epochs")]
        cells += [_md(_setting_text(k, r.get(k))) for _, k in varying]
        prior = _setting_text("prior", r.get("prior"))
        if r.get("prior") == "flow" and len(flows) > 1 and _flow_text(r.get("prior_settings")):
            prior += f" ({_flow_text(r.get('prior_settings'))})"
        cells.append(_md(prior))
        for _, key, places, _ in metric_columns:
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
        ("hidden", "hidden layer sizes: the MLP's h1 × h2 (encoder 794 → h1 → h2, decoder the "
                   "mirror); conv's one fully connected layer h"),
        ("act", "hidden activation"),
        ("schedule", "β / learning-rate schedule (`cvae train --help`)"),
        ("epochs", "training epochs"),
    ]
    definitions += [(h, {"model": "the network: the MLP, or conv C1×C2 (`--variant conv`, its "
                                  "convolutions' channels)",
                         "digits": "digits trained and evaluated on", "batch": "minibatch size",
                         "lr": "base learning rate", "seed": "training seed",
                         "eval seed": "noise seed of the evaluation"}[h]) for h, _ in varying]
    flow = (f" ({next(iter(flows))})" if len(flows) == 1 and next(iter(flows)) else "")
    definitions.append(("prior", "the prior the generated digits of cond. acc., FID, diversity "
                                 "and samples are drawn from: gaussian, z ~ N(0, T² I), the "
                                 "CVAE's own; flow, the run's flow-matching prior (`prior.cvae`, "
                                 f"`cvae prior train`){flow}, carrying those draws to where the "
                                 "codes are. The other metrics are the run's, the same on each "
                                 "of its rows"))
    definitions += [(h, d) for h, _, _, d in metric_columns]
    definitions.append(("samples", "the run's digit sheet from the row's prior: 10 samples per "
                                   "digit, temperature 1, one row per digit (PGM, with a JSON "
                                   "sidecar): `samples.pgm` (gaussian) or `samples-flow.pgm` "
                                   "(flow, the same draws carried by the flow)"))
    lines += [f"- **{h}**: {d}" for h, d in definitions]
    return "\n".join(lines) + "\n"


def write_table(table_dir, rows, title):
    """sweep.jsonl and sweep.md in table_dir, each written atomically."""
    rows = sorted(rows, key=_sort_key)
    jsonl = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
    md = render_markdown(rows, title)
    paths = (os.path.join(table_dir, SWEEP_JSONL), os.path.join(table_dir, SWEEP_MD))
    for path, text in zip(paths, (jsonl, md)):
        write_text_atomic(path, text)
    return paths


# ---------------------------------------------------------------- cvae sweep --collect


def collect(directory):
    """(rows of the finished runs, [(run_dir, why unfinished)], [notes on damaged lines of
    metrics.jsonl left out]) of the subdirectories of directory that hold a run (config.json
    or a checkpoint)."""
    try:
        names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise CvaeError(f"cannot read --collect {directory}: {e.strerror or e}") from None
    rows, unfinished, notes = [], [], []
    for name in names:
        run_dir = os.path.join(directory, name)
        has_config = os.path.isfile(R.path(run_dir, R.CONFIG))
        try:
            checkpoints = R.list_checkpoints(run_dir)
        except CvaeError:
            checkpoints = []
        if not has_config and not checkpoints:
            continue  # not a run directory
        why = None
        config = R.read_config(run_dir)
        if not has_config or not config:
            why = "no readable config.json"
        else:
            try:
                state, plan = R.training_state(run_dir)
            except CvaeError as e:
                state, plan, why = None, None, str(e)
            if why is None:
                epochs = config.get("epochs")
                if state == "none":  # results kept without checkpoints: go by the metrics
                    damaged = []
                    done = R.read_metrics(run_dir, problems=damaged)
                    notes += [f"{run_dir}: {problem}" for problem in damaged]
                    if not isinstance(epochs, int) or not done or done[-1]["epoch"] < epochs:
                        why = "training not complete"
                elif state == "partial":
                    why = f"training not complete (epoch {plan.epoch} of {plan.epochs})"
                else:
                    epochs = plan.epochs
                if why is None:
                    why = R.eval_problem(run_dir, epochs if isinstance(epochs, int) else 0)
        if why is None:
            rows += read_rows(directory, run_dir)
        else:
            unfinished.append((run_dir, why))
    return rows, unfinished, notes


def collect_table(directory):
    """`cvae sweep --collect DIR`: DIR/sweep.jsonl and DIR/sweep.md from the finished runs
    under DIR; returns (rows sorted, [(run_dir, why unfinished)], notes, jsonl path,
    md path)."""
    if not os.path.exists(directory):
        raise CvaeError(f"--collect {directory}: no such directory")
    if not os.path.isdir(directory):
        raise CvaeError(f"--collect {directory} is not a directory")
    rows, unfinished, notes = collect(directory)
    if not rows:
        extra = f" ({len(unfinished)} unfinished)" if unfinished else ""
        raise CvaeError(f"--collect {directory}: no finished runs in it (a subdirectory with "
                        f"config.json, a complete training and eval.json){extra}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CvaeError(f"cannot write the table into {directory}: not writable")
    jsonl, md = write_table(directory, rows,
                            f"cvae sweep: {os.path.basename(os.path.abspath(directory))}")
    return sorted(rows, key=_sort_key), unfinished, notes, jsonl, md


# ---------------------------------------------------------------- cvae sweep


def summary(rows):
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
        for label, key, places in (("cond. acc.", "cond_accuracy", 4), ("FID", "fid", 2),
                                   ("CAS", "cas", 4)):
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


def commands(sweep, runs):
    """One shell line per run: train (or resume, when the run has a checkpoint), then with the
    flow prior asked train its prior (or resume it, when the run has prior.cvae), then eval."""
    common = []  # options the resume, the prior and the evaluation take too
    for name in ("threads", "data"):
        if getattr(sweep, name) is not None:
            common += [f"--{name}", str(getattr(sweep, name))]
    priors = sweep_priors(sweep)
    ev = [f"--{name}={getattr(sweep, name)}" for name in EVAL_OPTIONS if getattr(sweep, name) is not None]
    ev.append(f"--prior={eval_prior_choice(priors)}")
    lines = []
    for run in runs:
        d = shlex.quote(run.run_dir)
        train = " ".join(shlex.quote(o) for o in run.train_options(sweep))
        both = "".join(" " + shlex.quote(o) for o in common)
        evs = "".join(" " + shlex.quote(o) for o in ["--seed", str(run.plan.seed), *ev])
        prior = ""
        if "flow" in priors:
            fresh = [] if sweep.prior_epochs is None else ["--epochs", str(sweep.prior_epochs)]
            fresh = "".join(" " + shlex.quote(o) for o in fresh)
            prior = (f"if [ -e {d}/{R.PRIOR} ]; then cvae prior train --checkpoint {d} "
                     f"--resume{both} --quiet; else cvae prior train --checkpoint {d}{fresh}{both} "
                     f"--quiet; fi && ")
        lines.append(f"if [ -e {d}/{R.LAST} ]; then cvae train --resume {d}{both} --quiet; "
                     f"else cvae train --out {d} {train} --quiet; fi && {prior}"
                     f"cvae eval --checkpoint {d}{evs}{both} --json")
    return lines


def check_sweep(sweep):
    """The sweep's runs (Run), after the checks that need nothing trained."""
    if sweep.out is None:
        raise CvaeError("give --out DIR (where the runs go), or --collect DIR to tabulate "
                        "finished runs (see 'cvae sweep --help')")
    if sweep.prior_epochs is not None and "flow" not in sweep_priors(sweep):
        raise CvaeError("--prior-epochs is the flow prior's training: add flow to --prior "
                        "(e.g. --prior gaussian,flow)")
    return plan_runs(sweep)


def run_sweep(sweep, say, on_row=None):
    """Train, finish and evaluate every run of the sweep that is not finished, then write the
    table. say(text): progress lines; on_row(row, status) after each run, per table row.
    Returns (exit code, (jsonl, md) or None when stopped, number of rows)."""
    runs = check_sweep(sweep)
    priors = sweep_priors(sweep)
    threads = default_threads() if sweep.threads is None else sweep.threads
    seed = runs[0].plan.seed
    evaluate = {"data": None, "seed": seed, "threads": threads, "classifier": sweep.classifier,
                "prior": eval_prior_choice(priors), **eval_settings(sweep)}
    wanted = eval_wanted(sweep, seed)

    out = sweep.out
    _check_out(out)
    for run in runs:
        inspect_run(run, wanted, priors, prior_wanted(sweep, run.plan))
    todo = [r for r in runs if r.state != "finished"]
    data_dir = None
    if todo:
        data_dir, _ = ensure_data(sweep.data, say=say, notice=say)
        # Fail on missing or unreadable data now, before any run directory is made.
        for digits in {r.plan.digits for r in todo}:
            load_datasets(data_dir, digits)
    evaluate["data"] = data_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CvaeError(f"cannot create --out {out}: {e.strerror or e}") from None

    n = len(runs)
    current = None
    try:
        with interrupt_on_signals():
            for i, run in enumerate(runs, 1):
                current = run
                tag = f"[{i}/{n}] {run.name}"
                if run.state == "finished":
                    say(f"{tag}: skipped (finished)")
                    status = "skipped"
                else:
                    start = time.perf_counter()
                    code, status = _do_run(run, sweep, tag, say, threads, data_dir, evaluate,
                                           priors)
                    if code:
                        say_stopped(f"cvae: sweep stopped in run {run.name} ({i} of {n}); run "
                                    f"the same 'cvae sweep' command again to continue (finished "
                                    f"runs are skipped, this one resumes)")
                        return code, None, 0
                    done = "flow prior trained" if status == "prior" else status
                    say(f"{tag}: {done} in {time.perf_counter() - start:.1f} s: "
                        f"{summary(read_rows(out, run.run_dir, priors))}")
                if on_row is not None:
                    for row in read_rows(out, run.run_dir, priors):
                        on_row(row, status)
            current = None
            rows = [row for r in runs for row in read_rows(out, r.run_dir, priors)]
            paths = write_table(out, rows, f"cvae sweep: {os.path.basename(os.path.abspath(out))}")
    except Interrupted as e:
        where = f" in run {current.name}" if current is not None else ""
        say_stopped(f"cvae: {signal_name(e.signum)}: sweep stopped{where}; run the same 'cvae "
                    f"sweep' command again to continue (finished runs are skipped)")
        return signal_exit_code(e.signum), None, 0
    return 0, paths, len(rows)


def say_stopped(text):
    """Why the sweep stopped: on stderr, whatever the mode."""
    print(text, file=sys.stderr, flush=True)


def _do_run(run, sweep, tag, say, threads, data_dir, evaluate, priors=DEFAULT_PRIORS):
    """Train / resume / finish one run (with the flow prior asked, its prior too), holding its
    lock; (exit code, status). A non-zero code: interrupted."""
    with R.training_lock(run.run_dir, "cvae sweep " + shlex.join(sweep.argv)):
        return _do_locked_run(run, sweep, tag, say, threads, data_dir, evaluate, priors)


def _do_locked_run(run, sweep, tag, say, threads, data_dir, evaluate, priors):
    quiet = sweep.mode != "rich"
    reporter = Reporter() if quiet else RichReporter()
    result = None
    if run.state in ("new", "restart"):
        if run.state == "restart":
            # This run (same settings) was stopped before its first checkpoint: start it again.
            for name in (R.CONFIG, R.METRICS):
                try:
                    os.unlink(R.path(run.run_dir, name))
                except FileNotFoundError:
                    pass
        say(f"{tag}: training ({run.plan.epochs} epochs)")
        argv = ["train", "--out", run.run_dir, *run.train_options(sweep)]
        trainer = start_run(run.run_dir, run.plan, data_dir, threads, reporter,
                            config_extra={"variant": run.variant,
                                          "argv": argv, "sweep_argv": list(sweep.argv)})
        status = "trained"
    else:
        trainer = resume_run(run.run_dir, threads, data_dir, reporter)
        if run.state == "partial":
            p = trainer.plan
            say(f"{tag}: resuming at epoch {p.epoch + 1} of {p.epochs}")
            status = "resumed"
        else:
            what = next((why for why in (run.prior_problem, run.eval_problem,
                                         run.flow_sheet_problem) if why is not None),
                        f"no {R.SAMPLES}")
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
    flow = "flow" in priors
    prior_work = flow and run.prior_state != "complete"
    if prior_work:
        if run.prior_state == "partial":
            meta = R.read_prior(run.run_dir)[0]
            say(f"{tag}: flow prior: resuming at step {meta.get('step')} (epoch "
                f"{len(meta.get('epoch_losses') or []) + 1} of {meta.get('epochs')})")
        else:
            instead = (f"in place of its {R.PRIOR} of another checkpoint, "
                       if run.prior_state == "stale" else "")
            say(f"{tag}: flow prior: training {instead}"
                f"({_epochs(prior_settings(sweep)['epochs'])})")
    trained = result is not None
    needs = Finish(
        prior=flow, prior_settings=prior_settings(sweep), replace_stale=True,
        images=trained or not R.has_pictures(run.run_dir),
        flow_sheet=flow and (trained or prior_work or run.flow_sheet_problem is not None),
        evaluate=({**evaluate, "progress": not quiet}
                  if trained or prior_work or run.eval_problem is not None else None))
    done = finish_run(trainer, needs, mode="quiet" if quiet else "rich")
    return done.code, status
