"""The run directory: every file of a run, its name, its reader and its writer, and one rule
for when a file is out of date.

    RUN/config.json         what was asked for, and on which machine        read/write_config
    RUN/metrics.jsonl       one JSON object per completed epoch             read/write_metrics
    RUN/epoch-NNNN.cvae     the checkpoint after epoch NNNN                 RunStore.save
    RUN/last.cvae           the newest state, possibly mid-epoch (resume)   RunStore.save
    RUN/prior.cvae          the flow prior (kind "prior")                   prior_saver, prior_state
    RUN/eval.json           `cvae eval`'s figures                           write_eval, read_eval
    RUN/samples.pgm, samples-flow.pgm, reconstructions.pgm, interpolations.pgm,
        interpolations-classes.pgm (each with a .json sidecar)              write_run_images
    RUN/curves.png, RUN/latent.png                                          write_curves, write_latent
    RUN/report.html         `cvae report`'s page                            (cvae.report)

Everything is written atomically (cvae.atomic). Paths recorded inside a run's files are
relative to the file's own directory, so a run directory can be moved or copied and its files
carry no machine paths (config.json's data_dir, which resume uses to find the data, is the
exception).

Staleness: a file made from another is out of date when it is older than its source by more
than STALE_SECONDS (the slack lets a run directory copied without preserved times, files in
any order, still count as fresh): `is_older`.
"""

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import sys
import time

from cvae.atomic import atomic_open, check_writable, write_bytes_atomic, write_text_atomic
from cvae.catalogue import EPOCH, SAMPLE_METRICS
from cvae.checkpoint import SUFFIX, load_checkpoint, save_checkpoint
from cvae.classifier import SHIPPED
from cvae.data import NUM_DIGITS, Dataset, digits_text, has_mnist_files
from cvae.errors import CvaeError
from cvae.fetch import ensure_data, resolve_data_dir
from cvae.images import sidecar_path
from cvae.kernels import default_threads, resolve_precision
from cvae.model import encode_all, model_from_checkpoint, model_from_sections
from cvae.plots import curves_png, latent_png
from cvae.prior import (DEFAULT_GUIDANCE, DEFAULT_METHOD, DEFAULT_STEPS, KIND as PRIOR_KIND,
                        PRIORS, FlowSampler, GaussianPrior, check_sampling, cvae_digest,
                        load_prior)
from cvae.sheets import (DEFAULT_BATCH, DEFAULT_PAIRS, classes_path_for, interpolation_sheets,
                         reconstruction_sheet, sample_sheets)
from cvae.train import KIND as CVAE_KIND
from cvae.train import Plan
from cvae.train_prior import PriorPlan

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LAST = "last.cvae"
PRIOR = "prior.cvae"
EVAL = "eval.json"
SAMPLES = "samples.pgm"
FLOW_SAMPLES = "samples-flow.pgm"
RECONSTRUCTIONS = "reconstructions.pgm"
INTERPOLATIONS = "interpolations.pgm"
CURVES = "curves.png"
LATENT = "latent.png"
REPORT = "report.html"
LOCK = ".lock"
#: Epoch checkpoints a run keeps besides last.cvae (cvae train --keep).
DEFAULT_KEEP = 3
#: What a complete run's images are (write_run_images): all of them, or it gets them again.
RUN_PICTURES = (SAMPLES, RECONSTRUCTIONS, INTERPOLATIONS, classes_path_for(INTERPOLATIONS),
                CURVES, LATENT)
#: eval.json's "classifier" when the shipped classifier judged (its path is the install's).
SHIPPED_CLASSIFIER = "shipped"

_EPOCH_NAME = re.compile(r"epoch-(\d+)\.cvae\Z")
_CHUNK_BYTES = 1 << 20

#: A file older than the one it was made from by more than this is out of date.
STALE_SECONDS = 2.0


def path(run_dir, name):
    return os.path.join(os.fspath(run_dir), name)


def is_older(product, source, slack=STALE_SECONDS):
    """Whether file `product` is older than file `source` (False when either is missing)."""
    try:
        return os.path.getmtime(product) + slack < os.path.getmtime(source)
    except OSError:
        return False


def portable(target, base_dir):
    """`target` as recorded in a file of base_dir: relative to it."""
    return os.path.relpath(os.path.abspath(target), os.path.abspath(base_dir))


def read_json(file):
    """(document, problem): (None, None) when the file does not exist; (None, why) when it
    cannot be read or is not JSON."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot read {os.path.basename(file)}: {e.strerror or e}"
    except ValueError as e:
        return None, f"{os.path.basename(file)} is not valid JSON ({e})"
    except RecursionError:
        return None, f"{os.path.basename(file)} is nested too deeply to be cvae's"


# ---------------------------------------------------------------- checkpoints


def last_checkpoint_path(run_dir):
    return path(run_dir, LAST)


def epoch_checkpoint_path(run_dir, epoch):
    """`RUN/epoch-0003.cvae` for epoch 3 (zero-padded to 4, wider past 9999)."""
    return path(run_dir, f"epoch-{int(epoch):04d}{SUFFIX}")


def save_run_checkpoint(run_dir, kind, meta, sections, epoch=None):
    """Save into a run directory: `epoch-NNNN.cvae` when epoch is given, then always `last.cvae`.

    Mid-epoch saves (epoch=None) only replace last.cvae. The epoch file is written first and
    copied to last.cvae, so a crash in between leaves last.cvae one save behind: resume then
    redoes that epoch and rewrites the epoch file, losing nothing. Returns last.cvae's path.
    """
    last = last_checkpoint_path(run_dir)
    if epoch is None:
        save_checkpoint(last, kind, meta, sections)
        return last
    epoch_path = epoch_checkpoint_path(run_dir, epoch)
    save_checkpoint(epoch_path, kind, meta, sections)
    try:
        with open(epoch_path, "rb") as source, atomic_open(last, "wb") as target:
            shutil.copyfileobj(source, target, _CHUNK_BYTES)
    except OSError as e:
        raise CvaeError(f"cannot write checkpoint {last}: {e.strerror or e}") from None
    return last


def _checkpoint_order(name):
    match = _EPOCH_NAME.match(name)
    # Epoch files by number (not text: epoch-10000 sorts after epoch-9999), then others, last.cvae at the end.
    if match:
        return (0, int(match.group(1)), name)
    return (2 if name == LAST else 1, 0, name)


def list_checkpoints(run_dir):
    """Paths of every `*.cvae` in run_dir (not hidden temp files): epoch files by
    epoch, then any other names alphabetically, then last.cvae. [] if there are none."""
    run_dir = os.fspath(run_dir)
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        raise CvaeError(f"run directory {run_dir} does not exist") from None
    except NotADirectoryError:
        raise CvaeError(f"{run_dir} is not a directory") from None
    except OSError as e:
        raise CvaeError(f"cannot read run directory {run_dir}: {e.strerror or e}") from None
    names = [n for n in names if n.endswith(SUFFIX) and not n.startswith(".")
             and os.path.isfile(os.path.join(run_dir, n))]
    return [os.path.join(run_dir, n) for n in sorted(names, key=_checkpoint_order)]


def latest_checkpoint(run_dir):
    """The checkpoint to resume from: last.cvae, else the highest epoch file, else None."""
    last = last_checkpoint_path(run_dir)
    if os.path.isfile(last):
        return last
    epochs = [p for p in list_checkpoints(run_dir) if _EPOCH_NAME.match(os.path.basename(p))]
    return epochs[-1] if epochs else None


def is_final_checkpoint(name, epochs):
    """Whether a checkpoint's file name is one a complete run of `epochs` epochs ends with."""
    return os.path.basename(name) in (LAST, os.path.basename(epoch_checkpoint_path("", epochs)))


def resolve_checkpoint(arg):
    """(checkpoint path, run directory) for a .cvae file or a run directory (its latest)."""
    file = os.fspath(arg)
    if os.path.isdir(file):
        found = latest_checkpoint(file)
        if found is None:
            raise CvaeError(f"run directory {file} holds no checkpoint (last.cvae or "
                            f"epoch-NNNN.cvae)")
        return found, file
    if not os.path.exists(file):
        raise CvaeError(f"checkpoint {file} does not exist")
    return file, os.path.dirname(os.path.abspath(file))


def training_state(run_dir):
    """(state, plan or None): "none" (no checkpoint), "partial" or "complete", from the
    newest checkpoint's header (fully verified)."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return "none", None
    meta, _, _ = load_checkpoint(newest, expected_kind=CVAE_KIND)
    plan = Plan.from_meta(meta, newest)
    return ("complete" if plan.epoch >= plan.epochs else "partial"), plan


def read_training_checkpoint(run_dir):
    """(meta, sections, path) of the run's newest checkpoint, to resume from."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CvaeError(f"--resume {run_dir}: no such run directory")
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise CvaeError(f"--resume {run_dir}: no checkpoint (*.cvae) in it to resume from")
    meta, sections, _ = load_checkpoint(newest, expected_kind=CVAE_KIND)
    return meta, sections, newest


def prune_checkpoints(run_dir, keep):
    """Delete all but the newest `keep` epoch checkpoints (None: keep them all); last.cvae
    and every other file stay. Returns the paths deleted."""
    if keep is None:
        return []
    epochs = [p for p in list_checkpoints(run_dir) if _EPOCH_NAME.match(os.path.basename(p))]
    old = epochs[:max(0, len(epochs) - keep)]
    for file in old:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)
    return old


class RunStore:
    """Where a Trainer (cvae.train) keeps its run: checkpoints (the newest `keep` epoch files
    besides last.cvae; None keeps all) and the per-epoch metrics."""

    def __init__(self, run_dir, keep=DEFAULT_KEEP):
        self.path = os.fspath(run_dir)
        self.keep = keep

    def save(self, kind, meta, sections, epoch=None):
        last = save_run_checkpoint(self.path, kind, meta, sections, epoch=epoch)
        if epoch is not None:
            prune_checkpoints(self.path, self.keep)
        return last

    def write_metrics(self, records):
        write_metrics(self.path, records)

    def has_checkpoint(self):
        return bool(list_checkpoints(self.path))

    def last_checkpoint(self):
        return last_checkpoint_path(self.path)


# ---------------------------------------------------------------- the lock and healing


@contextlib.contextmanager
def training_lock(run_dir, what):
    """Hold RUN/.lock while `what` (a command line) changes the run: a second process that
    would train the same run stops with one line naming this one. The lock is an flock, so
    the kernel releases it when its process dies however it dies: a lock left by a killed
    process is taken over by the next. Reading commands never take it. The run directory is
    made when missing, and removed again when nothing but the lock went into it; the lock
    file is removed on release, so a command that failed leaves the directory as it was."""
    run_dir = os.fspath(run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise CvaeError(f"{run_dir} exists and is not a directory")
    created = not os.path.exists(run_dir)
    lock = path(run_dir, LOCK)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = _take_lock(lock)
    except OSError as e:
        raise CvaeError(f"cannot lock the run directory {run_dir}: {e.strerror or e}") from None
    if fd is None:
        try:
            with open(lock, encoding="utf-8", errors="replace") as f:
                holder = f.read().strip()
        except OSError:
            holder = ""
        raise CvaeError(f"{run_dir} is being trained by {holder or 'another process'}: wait "
                        f"for it to finish or stop it (Ctrl-C or SIGTERM save a checkpoint) "
                        f"before you start another training of this run")
    try:
        os.write(fd, (f"process {os.getpid()} on {socket.gethostname()} ({what}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n").encode("utf-8", "replace"))
        yield
    finally:
        # Unlink first, then release: a process that opened the old file meanwhile finds
        # it no longer at the path (_take_lock) and takes a new one.
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)  # only when nothing went into it


def _take_lock(lock):
    """An fd holding an exclusive flock on the file at `lock`, or None when another process
    holds it. Retries when the file it locked was removed (released) in between."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)


def heal(run_dir, note):
    """Before a run continues (under its lock): remove the temporary files a killed write left
    (atomic writes go through hidden *.tmp files), and rewrite metrics.jsonl without lines that
    are not records (a crash during an append cuts one short). note(text) says what was done.
    Nothing a complete file holds is ever changed."""
    for stray in sorted(glob.glob(os.path.join(glob.escape(os.fspath(run_dir)), ".*.tmp"))):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stray)
            note(f"cvae: note: removed {stray}, the remains of an interrupted write")
    problems = []
    records = read_metrics(run_dir, problems=problems)
    if problems:
        write_metrics(run_dir, records)
        for problem in problems:
            note(f"cvae: note: {run_dir}: {problem} (repaired)")


# ---------------------------------------------------------------- config.json and metrics.jsonl


def check_fresh_run_dir(run_dir, create=True):
    """Refuse a run_dir that already holds a run; create it (unless create=False)."""
    run_dir = os.fspath(run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise CvaeError(f"--out {run_dir} exists and is not a directory")
    if os.path.isdir(run_dir) and list_checkpoints(run_dir):
        raise CvaeError(f"{run_dir} already holds a run (it has checkpoints): continue it with "
                        f"'cvae train --resume {run_dir}' or choose another --out")
    for name in (CONFIG, METRICS):
        if os.path.exists(path(run_dir, name)):
            raise CvaeError(f"{run_dir} already holds a run's outputs ({name}): choose another "
                            f"--out")
    if not create:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise CvaeError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from None


def read_config(run_dir):
    """The run's config.json as a dict ({} when missing or unreadable)."""
    config, _ = read_json(path(run_dir, CONFIG))
    return config if isinstance(config, dict) else {}


def arch_text(arch):
    """config.json's "arch" in words, whatever it holds (it is shown, not trusted): the MLP's
    '640-320-128 elu', conv's 'conv 32-64-512-128 elu', '' for no architecture."""
    if not isinstance(arch, dict) or not arch:
        return ""
    if arch.get("type") == "conv":
        channels = arch.get("channels")
        sizes = [*(channels if isinstance(channels, list) else [channels]), arch.get("hidden"),
                 arch.get("latent")]
        return f"conv {'-'.join(map(str, sizes))} {arch.get('act', '')}".strip()
    return f"{arch.get('h1')}-{arch.get('h2')}-{arch.get('latent')} {arch.get('act', '')}".strip()


def write_config(run_dir, config):
    write_text_atomic(path(run_dir, CONFIG), json.dumps(config, indent=2, default=str) + "\n")


def recorded_prior(run_dir):
    """The latent prior the run ends with: config.json's "prior" (`cvae train --prior`), else
    gaussian (N(0, I): nothing to train)."""
    prior = read_config(run_dir).get("prior")
    return prior if prior in PRIORS else "gaussian"


def record_prior(run_dir, prior):
    """Set config.json's "prior" (a run without config.json is left as it is)."""
    config = read_config(run_dir)
    if config and config.get("prior") != prior:
        write_config(run_dir, {**config, "prior": prior})


def recorded_data_dir(run_dir):
    """The data directory config.json says the run was started with, if it still exists."""
    data_dir = read_config(run_dir).get("data_dir")
    return data_dir if isinstance(data_dir, str) and os.path.isdir(data_dir) else None


def run_data_dir(data, run_dir, say=None, notice=None):
    """The data directory for work on an existing run: `data` (--data), else $CVAE_DATA, else
    the one the run was started with (config.json), else the cache (fetched when empty)."""
    if not data and not os.environ.get("CVAE_DATA"):
        data = recorded_data_dir(run_dir)
    return ensure_data(data, say=say, notice=notice)[0]


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_record_problem(record):
    """Why a metrics.jsonl line is not an epoch's record cvae wrote, or None. Every figure
    of the catalogue's EPOCH must be a number (NaN and infinities aside, which a diverged run
    can record), the phase a string."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if type(record.get("epoch")) is not int or record["epoch"] < 1:
        return "no epoch number"
    for key in EPOCH:
        if key not in record or record[key] is None:
            continue
        value = record[key]
        if key == "phase":
            if not isinstance(value, str):
                return f"its phase is {value!r}"
        elif not _is_number(value):
            return f"its {key} is {value!r}, not a number"
    return None


def read_metrics(run_dir, upto_epoch=None, problems=None):
    """The records of metrics.jsonl (epochs ≤ upto_epoch). A line that is not a record
    (cut short by a crash, or edited into something else) is dropped, and when a list is
    given as `problems`, said there (line number and why)."""
    file = path(run_dir, METRICS)
    records = []
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    why = "not valid JSON" + ("" if line.endswith("\n") else " (cut short)")
                else:
                    why = metrics_record_problem(record)
                if why is not None:
                    if problems is not None:
                        problems.append(f"{METRICS} line {number}: {why}; left out")
                    continue
                if upto_epoch is None or record["epoch"] <= upto_epoch:
                    records.append(record)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CvaeError(f"cannot read {file}: {e.strerror or e}") from None
    return records


def write_metrics(run_dir, records):
    """Whole-file atomic rewrite: readers never see a half line."""
    write_text_atomic(path(run_dir, METRICS), "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- eval.json


def eval_path(checkpoint):
    """eval.json beside the checkpoint; an error now if it cannot be written there."""
    return check_writable(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), EVAL))


def write_eval(file, result, classifier_shipped):
    """eval.json with the paths it records relative to its directory: the checkpoint by
    name, the classifier 'shipped' or relative."""
    base = os.path.dirname(os.path.abspath(file))
    document = {k: v for k, v in result.items() if k != "eval_json"}
    document["checkpoint"] = portable(result["checkpoint"], base)
    if result.get("classifier") is not None:
        document["classifier"] = (SHIPPED_CLASSIFIER if classifier_shipped
                                  else portable(result["classifier"], base))
    write_text_atomic(file, json.dumps(document, indent=1) + "\n")


def judged_priors(evaluation):
    """The priors (flow before gaussian) whose generated digits an eval.json judged: its
    by_prior's. One from before the flow prior (no by_prior) judged N(0, I). Without a
    classifier by_prior is empty (there are no sample metrics at all): the top-level prior,
    an evaluation with the flow standing for both."""
    by = evaluation.get("by_prior")
    if not isinstance(by, dict):
        names = ["gaussian"]
    elif by:
        names = list(by)
    else:
        names = ["flow", "gaussian"] if evaluation.get("prior") == "flow" else ["gaussian"]
    return [p for p in sorted(PRIORS) if p in names]


def _figures(evaluation, prior):
    by = evaluation.get("by_prior")
    if isinstance(by, dict) and by:
        return by.get(prior) if isinstance(by.get(prior), dict) else {}
    top = evaluation.get("prior") if isinstance(by, dict) else "gaussian"
    if top != prior and not (top == "flow" and isinstance(by, dict)):
        return {}
    settings = evaluation.get("prior_settings") if top == prior else None
    return {**(settings if isinstance(settings, dict) else {}),
            **{key: evaluation.get(key) for key in SAMPLE_METRICS}}


def read_eval(run_dir):
    """(eval.json normalised, problem). Normalised: "by_prior" maps each prior it judged
    (judged_priors) to that prior's figures, whatever version of cvae wrote the file (one from
    before the flow prior: N(0, I)'s figures are its top level's). (None, None) when missing;
    (None, why) when unreadable or not a JSON object."""
    evaluation, problem = read_json(path(run_dir, EVAL))
    if evaluation is None:
        return None, problem
    if not isinstance(evaluation, dict):
        return None, f"{EVAL} does not hold a JSON object"
    evaluation = dict(evaluation)
    evaluation["by_prior"] = {p: _figures(evaluation, p) for p in judged_priors(evaluation)}
    return evaluation, None


def eval_problem(run_dir, epochs, wanted=None, priors=None, flow=None):
    """None when RUN/eval.json evaluates the run's final checkpoint (and, given wanted, with
    those settings; given priors, judging each of them, the flow with the sampling of flow);
    otherwise why it does not. An eval.json that judged the flow prior must not be older than
    the run's prior.cvae, nor any eval.json older than its checkpoint."""
    file = path(run_dir, EVAL)
    evaluation, why = read_eval(run_dir)
    if evaluation is None:
        return why or f"no {EVAL}"
    named = evaluation.get("checkpoint")
    if not isinstance(named, str) or not is_final_checkpoint(named, epochs):
        return f"eval.json is of another checkpoint ({named})"
    if is_older(file, path(run_dir, os.path.basename(named))):
        return f"eval.json is older than {os.path.basename(named)}"
    for key, value in (wanted or {}).items():
        if key not in evaluation:
            return f"eval.json does not record {key}"
        if key == "classifier":
            have = _judged_by(evaluation, run_dir)
            if value is None and have not in (None, SHIPPED_CLASSIFIER, SHIPPED):
                return f"eval.json was judged by {have} (this sweep: the default classifier)"
            if value is not None and have != os.path.abspath(value):
                return f"eval.json was judged by {have} (this sweep: {value})"
        elif evaluation[key] != value:
            return f"eval.json has {key} {evaluation[key]} (this sweep: {value})"
    judged = evaluation["by_prior"]
    for prior in priors or ():
        if prior not in judged:
            return f"eval.json does not judge the {prior} prior"
    if flow is not None and "flow" in (priors or ()):
        for key, value in flow.items():
            if judged["flow"].get(key) != value:
                return (f"eval.json's flow prior has {key} {judged['flow'].get(key)} (this "
                        f"sweep: {value})")
    if "flow" in (judged if priors is None else priors) and is_older(file, prior_path(run_dir)):
        return f"eval.json is older than {PRIOR}"
    return None


def _judged_by(evaluation, run_dir):
    """The classifier an eval.json records: None, 'shipped', or an absolute path (recorded
    relative to the run directory)."""
    recorded = evaluation.get("classifier")
    if recorded in (None, SHIPPED_CLASSIFIER) or not isinstance(recorded, str):
        return recorded
    return os.path.normpath(os.path.join(os.path.abspath(run_dir), recorded))


# ---------------------------------------------------------------- prior.cvae


def prior_path(run_dir):
    return path(run_dir, PRIOR)


def prior_saver(run_dir):
    """save(meta, sections) writing RUN/prior.cvae (atomically), for cvae.train_prior."""
    file = prior_path(run_dir)
    return lambda meta, sections: save_checkpoint(file, PRIOR_KIND, meta, sections)


def read_prior(run_dir):
    """(meta, sections, path) of RUN/prior.cvae."""
    file = prior_path(run_dir)
    meta, sections, _ = load_checkpoint(file, expected_kind=PRIOR_KIND)
    return meta, sections, file


def prior_summary(run_dir):
    """(PriorPlan, epoch losses) of RUN/prior.cvae, or None without one."""
    if not os.path.isfile(prior_path(run_dir)):
        return None
    meta, _, file = read_prior(run_dir)
    return PriorPlan.from_meta(meta, file)


def prior_state(run_dir, model):
    """(state, header meta) of RUN/prior.cvae for the CVAE `model`: 'none', 'stale' (the prior
    of other CVAE parameters: an earlier checkpoint's, or a run since continued), 'partial'
    (its training was stopped) or 'complete'. A damaged file is a CvaeError."""
    if not os.path.isfile(prior_path(run_dir)):
        return "none", None
    meta, _, _ = read_prior(run_dir)
    if meta.get("cvae_sha256") != cvae_digest(model):
        return "stale", meta
    return ("complete" if meta.get("complete") else "partial"), meta


def stale_prior_error(run_dir):
    """The error for a RUN/prior.cvae of other CVAE parameters than the run's newest."""
    return CvaeError(f"{prior_path(run_dir)} is the prior of other CVAE parameters than the "
                     f"run's newest checkpoint (an earlier checkpoint's?): delete it, and "
                     f"'cvae train --resume {run_dir}' trains a new {PRIOR} for the "
                     f"finished CVAE")


def _prior_of_newest_checkpoint(run_dir):
    """Whether RUN/prior.cvae was trained for the run's newest checkpoint."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return False
    return prior_state(run_dir, model_from_checkpoint(newest, max_batch=16)[0])[0] != "stale"


def default_prior(run_dir, model):
    """'flow' when RUN/prior.cvae is a complete prior of this CVAE, else 'gaussian'. A prior
    of the run that cannot serve this checkpoint (partly trained, or trained for the run's
    newest checkpoint while an earlier one is asked for) is passed over with a note on stderr;
    a prior of none of the run's checkpoints (copied from another run) is an error."""
    state, _ = prior_state(run_dir, model)
    file = prior_path(run_dir)
    if state == "stale" and not _prior_of_newest_checkpoint(run_dir):
        raise CvaeError(f"{file} is the prior of another CVAE (it fits none of this run's "
                        f"checkpoints): use --prior gaussian, or delete it and train one with "
                        f"'cvae prior train --checkpoint {run_dir}'")
    why = {"partial": f"is partly trained (finish it: cvae prior train --checkpoint {run_dir} "
                      f"--resume)",
           "stale": "belongs to the run's newest checkpoint, not to this one"}.get(state)
    if why:
        print(f"cvae: note: {file} {why}; sampling from N(0, I)", file=sys.stderr, flush=True)
    return "flow" if state == "complete" else "gaussian"


def open_priors(choice, run_dir, model, threads=1, steps=DEFAULT_STEPS, method=DEFAULT_METHOD,
                guidance=DEFAULT_GUIDANCE):
    """The samplers for --prior: 'flow', 'gaussian', 'both' (flow first) or None (both when
    default_prior is flow, else gaussian). The flow runs in the model's precision."""
    check_sampling(steps, method, guidance)
    if choice is None:
        choice = "both" if default_prior(run_dir, model) == "flow" else "gaussian"
    if choice not in PRIORS + ("both",):
        raise CvaeError(f"--prior must be flow, gaussian or both, got {choice!r}")
    samplers = []
    if choice in ("flow", "both"):
        file = prior_path(run_dir)
        if not os.path.isfile(file):
            raise CvaeError(f"{run_dir} has no flow prior ({PRIOR}): train one with 'cvae "
                            f"prior train --checkpoint {run_dir}', or use --prior gaussian")
        prior, _ = load_prior(file, model, threads, model.precision)
        samplers.append(FlowSampler(prior, file, model.arch.latent, steps, method, guidance))
    if choice in ("gaussian", "both"):
        samplers.append(GaussianPrior(model.arch.latent))
    return samplers


def open_prior(choice, run_dir, model, threads=1, steps=DEFAULT_STEPS, method=DEFAULT_METHOD,
               guidance=DEFAULT_GUIDANCE):
    """The sampler for --prior: 'flow', 'gaussian' or None (default_prior)."""
    if choice is None:
        choice = default_prior(run_dir, model)
    if choice not in PRIORS:
        raise CvaeError(f"--prior must be flow or gaussian, got {choice!r}")
    return open_priors(choice, run_dir, model, threads, steps, method, guidance)[0]


# ---------------------------------------------------------------- models and data of a run


def open_model(checkpoint, threads=None, batch=DEFAULT_BATCH, precision=None):
    """(model, meta) of a CVAE checkpoint, for sampling and evaluation (threads None: all);
    its Adam state is not loaded: the model is not trained further.
    precision: fp32, bf16 or auto (cvae.kernels.resolve_precision); None: the one the run
    was trained in, so that a run's own sheets and a command's agree."""
    threads = default_threads() if threads is None else threads
    if threads <= 0:
        raise CvaeError(f"--threads must be a positive integer, got {threads}")
    meta, sections, _ = load_checkpoint(checkpoint, expected_kind=CVAE_KIND)
    trained_in = meta.get("precision", "fp32")
    precision, _ = resolve_precision(trained_in if precision is None else precision)
    model = model_from_sections(meta, sections, checkpoint, threads=threads, max_batch=batch,
                                precision=precision, optimizer=False)
    return model, meta


def checkpoint_digits(meta, source):
    """The digits a checkpoint was trained on, from meta["digits"]."""
    digits = meta.get("digits")
    ok = (isinstance(digits, list) and digits
          and all(type(d) is int and 0 <= d < NUM_DIGITS for d in digits))
    if not ok:
        raise CvaeError(f"{source}: its header does not say which digits it was trained on")
    return tuple(sorted(set(digits)))


def check_digits(wanted, trained, source):
    missing = [d for d in wanted if d not in trained]
    if missing:
        raise CvaeError(f"{source} was trained on digits {digits_text(trained)} only, not "
                        f"{digits_text(missing)}: a class it never saw decodes to noise")


def load_split(data, trained, split="test"):
    """The whole split (by default the test split: a row is then its index in the test file)
    of the data directory `data` (None: $CVAE_DATA, else the cache), which must hold every
    trained digit."""
    data_dir, source = resolve_data_dir(data)
    if source == "cache" and not has_mnist_files(data_dir, splits=(split,)):
        raise CvaeError(f"MNIST {split} data is not in the cache {data_dir}: run 'cvae data "
                        f"fetch' first, or give --data DIR")
    dataset = Dataset.load(data_dir, split)
    absent = [d for d in trained if d not in dataset.digits]
    if absent:
        raise CvaeError(f"{dataset.name} has no images of digit {digits_text(absent)}")
    return dataset


def sheet_path(out, run_dir, default_name):
    """--out, else RUN/default_name; must end in .pgm and its directory must be writable."""
    file = os.fspath(out) if out else os.path.join(run_dir, default_name)
    sidecar_path(file)  # rejects names not ending in .pgm
    return check_writable(file)


# ---------------------------------------------------------------- the run's pictures


def flow_sheet_problem(run_dir):
    """None when the run has its flow prior's digit sheet, as new as its prior.cvae; else
    why not."""
    sheet = path(run_dir, FLOW_SAMPLES)
    if not os.path.isfile(sheet):
        return f"no {FLOW_SAMPLES}"
    if is_older(sheet, prior_path(run_dir)):
        return f"{FLOW_SAMPLES} is older than {PRIOR}"
    return None


def write_flow_samples(model, run_dir, seed, digits, flow, directory=None):
    """The run's flow-prior digit sheet, directory/samples-flow.pgm (default: in run_dir),
    drawn like samples.pgm (10 per digit at T = 1, the run's seed); returns its paths."""
    directory = directory or os.fspath(run_dir)
    paths, _, _ = sample_sheets(model, tuple(int(d) for d in digits),
                                os.path.join(directory, FLOW_SAMPLES), per_digit=10,
                                temperature=1.0, seed=seed, cols=10,
                                extra={"run_dir": portable(run_dir, directory)}, prior=flow)
    return paths


def write_curves(run_dir, records=None):
    """Draw RUN/curves.png from the run's metrics.jsonl (or the given records), atomically;
    returns its path. A CvaeError when there are no per-epoch metrics."""
    records = read_metrics(run_dir) if records is None else records
    return write_bytes_atomic(path(run_dir, CURVES),
                              curves_png(records, title=curves_title(run_dir)))


def curves_title(run_dir):
    return (f"{os.path.basename(os.path.abspath(run_dir))}: training curves (nats per image; "
            f"test figures at β = 1)")


def latent_picture(model, test_dataset):
    """PNG bytes: the test set's latent means, 2-D PCA coloured by digit."""
    if len(test_dataset.labels) == 0:
        raise CvaeError(f"{getattr(test_dataset, 'name', 'the test set')} has no images to "
                        f"encode")
    mu, _ = encode_all(model, test_dataset.images, test_dataset.labels)
    return latent_png(mu, test_dataset.labels)


def write_latent(model, test_dataset, run_dir):
    """Draw RUN/latent.png from the test set's latent means, atomically; returns its path."""
    return write_bytes_atomic(path(run_dir, LATENT), latent_picture(model, test_dataset))


def write_run_sheets(model, test_dataset, run_dir, seed, digits, flow=None):
    """A complete run's digit sheets in run_dir: reconstructions.pgm, samples.pgm (one row of
    10 per digit, temperature 1, N(0, I)), with a flow prior sampler samples-flow.pgm (the
    same draws carried by the flow), interpolations.pgm and interpolations-classes.pgm, each
    with its sidecar. Returns their paths."""
    run_dir = os.fspath(run_dir)
    digits = tuple(int(d) for d in digits)
    extra = {"run_dir": "."}
    paths, _ = reconstruction_sheet(model, test_dataset, digits, path(run_dir, RECONSTRUCTIONS),
                                    seed=seed, extra=extra)
    samples, _, _ = sample_sheets(model, digits, path(run_dir, SAMPLES), per_digit=10,
                                  temperature=1.0, seed=seed, cols=10, extra=extra)
    paths += samples
    if flow is not None:
        paths += write_flow_samples(model, run_dir, seed, digits, flow)
    interp = path(run_dir, INTERPOLATIONS)
    paths += interpolation_sheets(model, test_dataset, digits, interp, classes_path_for(interp),
                                  pairs=max(DEFAULT_PAIRS, len(digits)), seed=seed, extra=extra)
    return paths


def write_run_images(model, test_dataset, run_dir, seed, digits, records, flow=None):
    """write_run_sheets, then curves.png (from the per-epoch records) and latent.png."""
    paths = write_run_sheets(model, test_dataset, run_dir, seed, digits, flow)
    return paths + [write_curves(run_dir, records), write_latent(model, test_dataset, run_dir)]


def has_pictures(run_dir):
    return all(os.path.isfile(path(run_dir, name)) for name in RUN_PICTURES)
