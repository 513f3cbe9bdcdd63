"""The training loop: schedules, progress, per-epoch test ELBO, checkpoints, stop and resume.

A run directory holds ``config.json`` (what was asked for, including machine details),
``metrics.jsonl`` (one object per completed epoch), ``epoch-NNNN.cvae`` after every epoch and
``last.cvae`` (the newest state, possibly mid-epoch). Checkpoint metadata holds only what
determines the computation (no wall-clock values, no thread count), so a run stopped and
resumed, at an epoch end or mid-epoch, writes byte-identical checkpoints to an uninterrupted
one: the model is deterministic across thread counts, batches are a pure function of
(seed, epoch) and the schedule a pure function of the step.
"""

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import cvae
from cvae.atomic import write_text_atomic
from cvae.checkpoint import (
    LAST_NAME,
    latest_checkpoint,
    list_checkpoints,
    save_run_checkpoint,
)
from cvae.data import BatchStream, Dataset
from cvae.errors import CvaeError
from cvae.evaluate import EVAL_STEP, test_elbo  # noqa: F401  (EVAL_STEP: the test set's noise key)
from cvae.model import Arch, Model, arch_from_json, model_from_sections
from cvae.schedule import schedule_from_json

KIND = "cvae"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---------------------------------------------------------------- run plan


@dataclass
class Plan:
    """Everything that determines the computation; stored in every checkpoint's meta."""

    arch: Arch
    digits: tuple
    schedule: object
    epochs: int
    seed: int
    batch: int
    lr: float
    data: dict
    # position
    epoch: int = 0           # completed epochs
    batch_in_epoch: int = 0  # batches done in epoch `epoch` (0 at epoch ends)
    step: int = 0            # global steps done
    # running sums of a partly done epoch: [images, loss·b, rec·b, kl·b]
    epoch_sums: list = field(default_factory=lambda: [0, 0.0, 0.0, 0.0])

    def meta(self, adam_t):
        meta = {
            "arch": self.arch.to_json(),
            "digits": list(self.digits),
            "schedule": self.schedule.to_json(),
            "epochs": self.epochs,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "adam_t": int(adam_t),
            "seed": self.seed,
            "batch": self.batch,
            "lr": self.lr,
            "data": self.data,
        }
        if self.batch_in_epoch:
            meta["epoch_sums"] = list(self.epoch_sums)
        return meta

    @classmethod
    def from_meta(cls, meta, source):
        try:
            lr = float(meta["lr"])
            plan = cls(
                arch=arch_from_json(meta["arch"], source),
                digits=tuple(int(d) for d in meta["digits"]),
                schedule=schedule_from_json(meta["schedule"], lr, source),
                epochs=int(meta["epochs"]),
                seed=int(meta["seed"]),
                batch=int(meta["batch"]),
                lr=lr,
                data=dict(meta.get("data", {})),
                epoch=int(meta["epoch"]),
                batch_in_epoch=int(meta["batch_in_epoch"]),
                step=int(meta["step"]),
            )
            if plan.batch_in_epoch:
                sums = meta["epoch_sums"]
                plan.epoch_sums = [int(sums[0]), float(sums[1]), float(sums[2]), float(sums[3])]
        except (KeyError, TypeError, ValueError, IndexError):
            raise CvaeError(f"{source}: not a training checkpoint (its header lacks the run's "
                            f"position or configuration)") from None
        if not (plan.epochs > 0 and plan.batch > 0 and 0 <= plan.epoch <= plan.epochs
                and plan.batch_in_epoch >= 0 and plan.step >= 0 and plan.seed >= 0):
            raise CvaeError(f"{source}: inconsistent training position in its header")
        return plan

    def to_config(self):
        meta = self.meta(0)
        for key in ("epoch", "batch_in_epoch", "step", "adam_t", "epoch_sums"):
            meta.pop(key, None)
        return meta


def data_description(train_set, test_set):
    return {"name": "MNIST", "train_images": len(train_set), "test_images": len(test_set)}


# ---------------------------------------------------------------- reporters


class Reporter:
    """Silent base: the trainer calls these; subclasses display."""

    #: steps between progress() calls
    every = 16

    def start(self, trainer):
        pass

    def epoch_start(self, epoch, epochs, start_batch, n_batches):
        pass

    def progress(self, done, loss, rec, kl, beta, phase, img_per_s):
        pass

    def epoch_end(self, record):
        pass

    def message(self, text):
        pass

    def finish(self, trainer, result):
        pass

    def close(self):
        pass


class JsonReporter(Reporter):
    """One JSON object per epoch on stdout; other messages on stderr."""

    every = 1 << 60

    def __init__(self, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def epoch_end(self, record):
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def message(self, text):
        print(text, file=self.err, flush=True)


class RichReporter(Reporter):
    """A rich progress bar per epoch (loss, rec, KL, β, phase, img/s, ETA), a line per
    finished epoch with its test ELBO, and a summary table at the end."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self._live = None
        self.task = None
        self.run_task = None
        self.records = []

    def _make_progress(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        return Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=4,
        )

    def start(self, trainer):
        plan = trainer.plan
        self.console.print(
            f"[bold]cvae train[/bold] {trainer.run_dir}: {plan.arch.h1}-{plan.arch.h2}-{plan.arch.latent} "
            f"{plan.arch.act}, {trainer.model.arch.n_params():,} parameters, digits "
            f"{','.join(map(str, plan.digits))} ({len(trainer.train_set):,} train / "
            f"{len(trainer.test_set):,} test images), batch {plan.batch}, lr {plan.lr:g}, "
            f"{plan.schedule.describe()}, {trainer.model.threads} threads, kernels "
            f"{trainer.model.kernel_isa}", soft_wrap=True)
        if plan.step:
            self.console.print(f"resuming at epoch {plan.epoch + 1}, batch {plan.batch_in_epoch} "
                               f"(step {plan.step:,})", soft_wrap=True)
        self._live = self._make_progress()
        self._live.start()
        total = plan.epochs * trainer.batches_per_epoch
        self.run_task = self._live.add_task("run", total=total, completed=plan.step, stats="")

    def epoch_start(self, epoch, epochs, start_batch, n_batches):
        self.epochs = epochs
        self._epoch_base = start_batch
        self.task = self._live.add_task(f"epoch {epoch + 1}/{epochs}", total=n_batches,
                                           completed=start_batch, stats="")

    def progress(self, done, loss, rec, kl, beta, phase, img_per_s):
        stats = (f"{phase} β={beta:.3g} loss {loss:.2f} rec {rec:.2f} KL {kl:.2f} "
                 f"{img_per_s:,.0f} img/s")
        self._live.update(self.task, completed=done, stats=stats)
        self._live.update(self.run_task, advance=done - self._epoch_base)
        self._epoch_base = done

    def epoch_end(self, record):
        self.records.append(record)
        if self.task is not None:
            self._live.remove_task(self.task)
            self.task = None
        self._live.update(self.run_task, completed=record["step"])
        self._live.console.print(
            f"epoch {record['epoch']}/{self.epochs} {record['phase']} β={record['beta']:.3g} "
            f"lr={record['lr']:.2g}  train {record['train_loss']:.2f}  test -ELBO "
            f"[bold]{record['test_neg_elbo']:.2f}[/bold] (rec {record['test_rec']:.2f}, "
            f"KL {record['test_kl']:.2f})  {record['img_per_s']:,.0f} img/s  "
            f"{record['seconds']:.1f} s", soft_wrap=True)

    def message(self, text):
        if self._live is not None:
            self._live.console.print(text, markup=False)
        else:
            self.console.print(text, markup=False)

    def close(self):
        if self._live is not None:
            self._live.stop()
            self._live = None

    def finish(self, trainer, result):
        self.close()
        records = trainer.records or self.records  # the whole run, earlier invocations included
        if not records:
            return
        from rich.table import Table

        from rich import box

        table = Table(title=f"{trainer.run_dir} (test set at β = 1, nats per image)",
                      title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
        for name in ("epoch", "phase", "β", "lr", "train", "-ELBO", "rec", "KL", "img/s", "s"):
            table.add_column(name, justify="left" if name == "phase" else "right", no_wrap=True)
        best = min(r["test_neg_elbo"] for r in records)
        for r in records:
            elbo = f"{r['test_neg_elbo']:.2f}"
            table.add_row(str(r["epoch"]), r["phase"], f"{r['beta']:.3g}", f"{r['lr']:.2g}",
                          f"{r['train_loss']:.2f}", f"[bold]{elbo}[/bold]" if r["test_neg_elbo"] == best else elbo,
                          f"{r['test_rec']:.2f}", f"{r['test_kl']:.2f}",
                          f"{r['img_per_s']:,.0f}", f"{r['seconds']:.1f}")
        self.console.print(table)


# ---------------------------------------------------------------- the trainer


@contextlib.contextmanager
def stop_on_signals(loop, say):
    """Inside, SIGINT and SIGTERM call loop.request_stop(signum): the loop finishes its step,
    saves and stops. A second signal, once loop.stop_signal is set, aborts at once
    (KeyboardInterrupt): checkpoints are atomic, so the last one saved stays intact."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if loop.stop_signal is not None:
            raise KeyboardInterrupt
        loop.request_stop(signum)
        say(f"{signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
            f"(send it again to abort without saving)")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@dataclass
class Result:
    status: str          # "complete", "stopped" (--stop-after-epochs) or "interrupted"
    exit_code: int
    epoch: int
    batch_in_epoch: int
    step: int
    checkpoint: str = None
    records: list = field(default_factory=list)


class Trainer:
    """Runs a Plan on a Model from the plan's position to the end (or a stop)."""

    def __init__(self, run_dir, model, plan, train_set, test_set, reporter=None, after_step=None):
        self.run_dir = os.fspath(run_dir)
        self.model = model
        self.plan = plan
        self.train_set = train_set
        self.test_set = test_set
        self.reporter = reporter or Reporter()
        # after_step(trainer, global_step): tests use it to inject a stop; None costs one test.
        self.after_step = after_step
        self.stream = BatchStream(train_set, plan.batch, plan.seed)
        self.batches_per_epoch = self.stream.batches_per_epoch
        self.total_steps = plan.epochs * self.batches_per_epoch
        self.stop_signal = None
        self.records = read_metrics(self.run_dir, upto_epoch=plan.epoch)
        expected_step = plan.epoch * self.batches_per_epoch + plan.batch_in_epoch
        if plan.step != expected_step or plan.batch_in_epoch >= self.batches_per_epoch:
            raise CvaeError(
                f"{self.run_dir}: the checkpoint's position (epoch {plan.epoch}, batch "
                f"{plan.batch_in_epoch}, step {plan.step}) does not fit this data "
                f"({self.batches_per_epoch} batches per epoch): was the data set changed?")

    # -- stopping
    def request_stop(self, signum=signal.SIGINT):
        """Finish the current step, save a checkpoint and stop (what SIGINT/SIGTERM do)."""
        self.stop_signal = signum

    # -- saving
    def _save(self, epoch=None):
        return save_run_checkpoint(self.run_dir, KIND, self.plan.meta(self.model.adam_t),
                                   self.model.state_sections(), epoch=epoch)

    def _write_metrics(self):
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        _write_text(os.path.join(self.run_dir, METRICS_NAME), text)

    # -- the loop
    def run(self, stop_after_epochs=None):
        try:
            with stop_on_signals(self, self.reporter.message):
                return self._run(stop_after_epochs)
        finally:
            self.reporter.close()

    def _run(self, stop_after_epochs):
        plan, model, reporter = self.plan, self.model, self.reporter
        at = plan.schedule.at
        train_step = model.train_step
        seed = plan.seed
        total = self.total_steps
        n_batches = self.batches_per_epoch
        every = max(1, reporter.every)
        hook = self.after_step
        perf = time.perf_counter
        epochs_done_here = 0
        reporter.start(self)

        while plan.epoch < plan.epochs:
            e = plan.epoch
            k = plan.batch_in_epoch
            n_img, s_loss, s_rec, s_kl = plan.epoch_sums
            step = plan.step
            images_here = 0
            phase, beta, lr = at(step, total, e)
            reporter.epoch_start(e, plan.epochs, k, n_batches)
            t0 = perf()
            for pixels, labels in self.stream.epoch(e, start_batch=k):
                phase, beta, lr = at(step, total, e)
                loss, rec, kl = train_step(pixels, labels, lr, beta, seed, step)
                if loss != loss or loss == math.inf:
                    saved = (f"the last good checkpoint is in {self.run_dir}"
                             if list_checkpoints(self.run_dir) else "no checkpoint was saved yet")
                    raise CvaeError(f"training diverged at epoch {e + 1}, step {step} (loss "
                                    f"{loss}); {saved}: try a lower --lr")
                b = len(labels)
                step += 1
                k += 1
                n_img += b
                images_here += b
                s_loss += loss * b
                s_rec += rec * b
                s_kl += kl * b
                if k % every == 0:
                    reporter.progress(k, s_loss / n_img, s_rec / n_img, s_kl / n_img, beta, phase,
                                      images_here / max(perf() - t0, 1e-9))
                if hook is not None:
                    hook(self, step)
                if self.stop_signal is not None and k < n_batches:
                    plan.step, plan.batch_in_epoch = step, k
                    plan.epoch_sums = [n_img, s_loss, s_rec, s_kl]
                    path = self._save(epoch=None)
                    return self._stopped(path)
            train_seconds = perf() - t0
            plan.epoch, plan.batch_in_epoch, plan.step = e + 1, 0, step
            plan.epoch_sums = [0, 0.0, 0.0, 0.0]
            neg_elbo, test_rec, test_kl = test_elbo(model, self.test_set, seed)
            seconds = perf() - t0
            record = {
                "epoch": e + 1, "step": step, "phase": phase, "beta": beta, "lr": lr,
                "train_loss": s_loss / n_img, "train_rec": s_rec / n_img, "train_kl": s_kl / n_img,
                "test_neg_elbo": neg_elbo, "test_rec": test_rec, "test_kl": test_kl,
                "img_per_s": images_here / max(train_seconds, 1e-9), "seconds": seconds,
            }
            if not math.isfinite(neg_elbo):
                raise CvaeError(f"the test ELBO is not finite after epoch {e + 1}: the model "
                                f"diverged; try a lower --lr")
            # Metrics first: resume drops records newer than its checkpoint, but could never
            # recreate one missing for an epoch the checkpoint says is done.
            self.records.append(record)
            self._write_metrics()
            path = self._save(epoch=e + 1)
            reporter.epoch_end(record)
            epochs_done_here += 1
            if self.stop_signal is not None:
                return self._stopped(path)
            if plan.epoch < plan.epochs and stop_after_epochs and epochs_done_here >= stop_after_epochs:
                result = self._result("stopped", 0, path)
                reporter.message(f"stopped after {epochs_done_here} epoch(s) as asked: {plan.epoch} of "
                                 f"{plan.epochs} done; continue with: cvae train --resume {self.run_dir}")
                reporter.finish(self, result)
                return result
        result = self._result("complete", 0, os.path.join(self.run_dir, LAST_NAME))
        reporter.finish(self, result)
        return result

    def _result(self, status, code, path):
        p = self.plan
        return Result(status, code, p.epoch, p.batch_in_epoch, p.step, path, list(self.records))

    def _stopped(self, path):
        p = self.plan
        name = signal.Signals(self.stop_signal).name if self.stop_signal in EXIT_SIGNAL else "stop"
        where = (f"after epoch {p.epoch}" if not p.batch_in_epoch else
                 f"in epoch {p.epoch + 1} at batch {p.batch_in_epoch}/{self.batches_per_epoch}")
        result = self._result("interrupted", EXIT_SIGNAL.get(self.stop_signal, 130), path)
        self.reporter.finish(self, result)
        print(f"cvae: {name}: stopped {where} (step {p.step:,} of {self.total_steps:,}); saved {path}\n"
              f"cvae: resume with: cvae train --resume {self.run_dir}", file=sys.stderr, flush=True)
        return result


# ---------------------------------------------------------------- metrics file


def _write_text(path, text):
    """Whole-file atomic rewrite: readers never see a half line."""
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise CvaeError(f"cannot write {path}: {e.strerror or e}") from None


def read_metrics(run_dir, upto_epoch=None):
    """The records of metrics.jsonl (epochs ≤ upto_epoch); unparsable lines are dropped."""
    path = os.path.join(os.fspath(run_dir), METRICS_NAME)
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                    if upto_epoch is None or record["epoch"] <= upto_epoch:
                        records.append(record)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CvaeError(f"cannot read {path}: {e.strerror or e}") from None
    return records


# ---------------------------------------------------------------- starting and resuming


def check_fresh_run_dir(run_dir, create=True):
    """Refuse a run_dir that already holds a run; create it (unless create=False)."""
    run_dir = os.fspath(run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise CvaeError(f"--out {run_dir} exists and is not a directory")
    if os.path.isdir(run_dir) and list_checkpoints(run_dir):
        raise CvaeError(f"{run_dir} already holds a run (it has checkpoints): continue it with "
                        f"'cvae train --resume {run_dir}' or choose another --out")
    for name in (CONFIG_NAME, METRICS_NAME):
        if os.path.exists(os.path.join(run_dir, name)):
            raise CvaeError(f"{run_dir} already holds a run's outputs ({name}): choose another "
                            f"--out")
    if not create:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise CvaeError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from None


def load_datasets(data_dir, digits):
    train_set = Dataset.load(data_dir, "train", digits)
    test_set = Dataset.load(data_dir, "test", digits)
    return train_set, test_set


def new_trainer(run_dir, plan, train_set, test_set, threads, reporter=None, after_step=None,
                config_extra=None):
    """A fresh run in run_dir (which must not hold one): model initialised from plan.seed,
    config.json written."""
    check_fresh_run_dir(run_dir)
    model = Model(plan.arch, max_batch=plan.batch, threads=threads)
    model.init_params(plan.seed)
    from cvae.kernels import build_name

    config = {"cvae_version": cvae.__version__, **plan.to_config(),
              "n_params": plan.arch.n_params(), "threads": threads,
              "kernels": build_name(), "isa": model.kernel_isa, **(config_extra or {})}
    _write_config(run_dir, config)
    return Trainer(run_dir, model, plan, train_set, test_set, reporter, after_step)


def load_resume_point(run_dir, threads):
    """(model, plan, checkpoint path) from a run directory's newest checkpoint."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CvaeError(f"--resume {run_dir}: no such run directory")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CvaeError(f"--resume {run_dir}: no checkpoint (*.cvae) in it to resume from")
    from cvae.checkpoint import load_checkpoint

    meta, sections, _ = load_checkpoint(path, expected_kind=KIND)
    plan = Plan.from_meta(meta, path)
    if not any(name.startswith("adam_") for name in sections):
        raise CvaeError(f"{path} has no optimizer state, so the run cannot continue exactly")
    model = model_from_sections(meta, sections, path, threads=threads, max_batch=plan.batch)
    if model.adam_t != plan.step:
        raise CvaeError(f"{path}: Adam's step count {model.adam_t} does not match the run's "
                        f"step {plan.step}")
    return model, plan, path


def resume_trainer(run_dir, threads, data_dir, reporter=None, after_step=None, loaded=None):
    from cvae.kernels import build_name

    model, plan, path = loaded or load_resume_point(run_dir, threads)
    started_with = recorded_config(run_dir).get("kernels")
    if started_with and started_with != build_name():
        print(f"cvae: warning: {run_dir} was started with the {started_with} kernels and "
              f"continues with {build_name()}: the result will not be bit-identical to an "
              f"uninterrupted run (CVAE_KERNELS={started_with} would be)", file=sys.stderr)
    train_set, test_set = load_datasets(data_dir, plan.digits)
    data = data_description(train_set, test_set)
    if plan.data and plan.data != data:
        raise CvaeError(f"{path} was trained on {plan.data}, but {data_dir} gives {data}")
    return Trainer(run_dir, model, plan, train_set, test_set, reporter, after_step)


def recorded_config(run_dir):
    """The run's config.json as a dict ({} when missing or unreadable)."""
    try:
        with open(os.path.join(os.fspath(run_dir), CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _write_config(run_dir, config):
    _write_text(os.path.join(os.fspath(run_dir), CONFIG_NAME),
                json.dumps(config, indent=2, default=str) + "\n")


def recorded_prior(run_dir):
    """The latent prior the run ends with: config.json's "prior" (`cvae train --prior`), else
    gaussian (N(0, I): nothing to train)."""
    from cvae.prior import PRIORS

    prior = recorded_config(run_dir).get("prior")
    return prior if prior in PRIORS else "gaussian"


def record_prior(run_dir, prior):
    """Set config.json's "prior" (a run without config.json is left as it is)."""
    config = recorded_config(run_dir)
    if config and config.get("prior") != prior:
        _write_config(run_dir, {**config, "prior": prior})


def recorded_data_dir(run_dir):
    """The data directory config.json says the run was started with, if it still exists."""
    data_dir = recorded_config(run_dir).get("data_dir")
    return data_dir if isinstance(data_dir, str) and os.path.isdir(data_dir) else None


def write_images(trainer, flow=None):
    """The run's reconstructions, digit sheet and interpolations (with `flow`, a
    cvae.prior.FlowSampler, also samples-flow.pgm: the same draws carried by the flow prior),
    then its pictures: curves.png (the per-epoch metrics) and latent.png (the test set's latent
    means by PCA)."""
    from cvae import plots, sample

    sample.write_run_images(trainer.model, trainer.test_set, trainer.run_dir,
                            trainer.plan.seed, trainer.plan.digits, flow=flow)
    plots.write_curves(trainer.run_dir, trainer.records)
    plots.write_latent_pca(trainer.model, trainer.test_set, trainer.run_dir)
