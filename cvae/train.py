"""The CVAE's training loop: schedule, progress, per-epoch test ELBO, saves, stop and resume.

A Plan is everything that determines the computation; the Trainer runs it on a Model from the
plan's position to the end, or to a stop (Ctrl-C, SIGTERM, --stop-after-epochs). It saves
through a `store` (cvae.rundir.RunStore: checkpoints after every epoch and when stopped, the
per-epoch metrics) and knows no file names. Checkpoint metadata holds only what determines
the computation (no wall-clock values, no thread count), so a run stopped and resumed, at an
epoch end or mid-epoch, writes byte-identical checkpoints to an uninterrupted one: the model
is deterministic across thread counts, batches are a pure function of (seed, epoch) and the
schedule a pure function of the step.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field

from cvae.checkpoint import header_int, header_numbers, register_kind_check
from cvae.data import BatchStream
from cvae.errors import CvaeError
from cvae.evaluate import test_elbo
from cvae.model import (PRECISIONS, VARIANTS, Arch, Model, arch_for_variant, arch_from_json,
                        model_from_sections)
from cvae.progress import Bar
from cvae.schedule import make_schedule, schedule_from_json
from cvae.signals import exit_code, signal_name, stop_on_signals

KIND = "cvae"
DEFAULT_VARIANT = "full"
DEFAULT_EPOCHS = 30
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3
DEFAULT_SCHEDULE = "progressive"
#: The precision `cvae train` runs in when none is asked for: bf16 where the CPU's bf16 dot
#: product is faster than its fp32 FMA, else fp32. bf16 passed the quality guard
#: (benchmarks/precision_guard.sh: the main command's test -ELBO 91.779 against fp32's 91.778,
#: the flow prior's conditional accuracy 99.12% against 99.14%).
DEFAULT_PRECISION = "auto"


# ---------------------------------------------------------------- run plan


@dataclass
class Plan:
    """Everything that determines the computation; stored in every checkpoint's meta."""

    arch: Arch  # or ConvArch
    digits: tuple
    schedule: object
    epochs: int
    seed: int
    batch: int
    lr: float
    data: dict
    precision: str = "fp32"  # of the GEMMs' inputs: fp32 or bf16 (cvae.model)
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
            "precision": self.precision,
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
                precision=str(meta.get("precision", "fp32")),  # runs from before bf16: fp32
            )
            if plan.batch_in_epoch:
                sums = meta["epoch_sums"]
                plan.epoch_sums = [int(sums[0]), float(sums[1]), float(sums[2]), float(sums[3])]
        except (KeyError, TypeError, ValueError, IndexError):
            raise CvaeError(f"{source}: not a training checkpoint (its header lacks the run's "
                            f"position or configuration)") from None
        if not (plan.epochs > 0 and plan.batch > 0 and 0 <= plan.epoch <= plan.epochs
                and plan.batch_in_epoch >= 0 and plan.step >= 0 and plan.seed >= 0
                and plan.precision in PRECISIONS):
            raise CvaeError(f"{source}: inconsistent training position in its header")
        return plan

    def to_config(self):
        meta = self.meta(0)
        for key in ("epoch", "batch_in_epoch", "step", "adam_t", "epoch_sums"):
            meta.pop(key, None)
        return meta


def check_training_checkpoint(meta, sections, path):
    """What load_checkpoint checks of a training checkpoint (kind "cvae", written by a
    Trainer: its header has "epochs"), after the network's check (cvae.model): the run's
    position and configuration (a Plan), integers and numbers where they belong, and the
    description of the data it was trained on (prior train compares and prints its counts).
    An exported model (weights, architecture and digits only) has nothing of it to check."""
    if "epochs" not in meta:
        return
    for key in ("seed", "step", "epoch", "epochs", "batch_in_epoch"):
        header_int(meta, key, path)
    header_numbers(meta, "lr", path)
    header_numbers(meta, "epoch_sums", path, required=False)
    data = meta.get("data", {})
    if not isinstance(data, dict):
        raise CvaeError(f"{path} is damaged: 'data' in its header is not an object")
    for key in ("train_images", "test_images"):
        header_int(data, key, path, required=False)
    Plan.from_meta(meta, path)


register_kind_check(KIND, check_training_checkpoint)


def make_arch(variant=DEFAULT_VARIANT, hidden=None, latent=None, act=None, channels=None):
    """The variant's architecture with the sizes given overriding its own: hidden is the MLP's
    (H1, H2) or conv's (H,) or H; channels (C1, C2) is conv's only."""
    conv = "channels" in VARIANTS[variant]
    if hidden is not None:
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if len(hidden) != (1 if conv else 2):
            raise CvaeError(f"--hidden {','.join(map(str, hidden))}: the {variant} variant takes "
                            + ("one hidden size, e.g. 512" if conv
                               else "two hidden sizes H1,H2, e.g. 640,320"))
        hidden = hidden[0] if conv else hidden
    return arch_for_variant(variant, act=act, hidden=hidden, latent=latent, channels=channels)


def make_plan(variant=DEFAULT_VARIANT, hidden=None, latent=None, act=None, digits=None,
              schedule=None, beta=None, schedule_settings=None, epochs=None, seed=None,
              batch=None, lr=None, precision="fp32", channels=None):
    """The Plan of a fresh run: the variant's sizes and digits unless overridden, the defaults
    for everything left None. beta is for the constant schedule only; precision fp32 or bf16
    (resolve auto with cvae.kernels.resolve_precision first)."""
    arch = make_arch(variant, hidden=hidden, latent=latent, act=act, channels=channels)
    settings = dict(schedule_settings or {})
    schedule_name = schedule or DEFAULT_SCHEDULE
    if beta is not None:
        if schedule_name != "constant":
            raise CvaeError(f"--beta is for --schedule constant (the {schedule_name} schedule "
                            f"sets β itself)")
        settings["beta"] = beta
    lr = DEFAULT_LR if lr is None else lr
    return Plan(arch=arch, digits=tuple(digits or VARIANTS[variant]["digits"]),
                schedule=make_schedule(schedule_name, lr, **settings),
                epochs=DEFAULT_EPOCHS if epochs is None else epochs,
                seed=0 if seed is None else seed,
                batch=DEFAULT_BATCH if batch is None else batch, lr=lr, data={},
                precision=precision)


def restore(meta, sections, source, threads):
    """(model, plan) of a training checkpoint's header and sections, to continue exactly."""
    plan = Plan.from_meta(meta, source)
    if not any(name.startswith("adam_") for name in sections):
        raise CvaeError(f"{source} has no optimizer state, so the run cannot continue exactly")
    model = model_from_sections(meta, sections, source, threads=threads, max_batch=plan.batch,
                                precision=plan.precision)
    if model.adam_t != plan.step:
        raise CvaeError(f"{source}: Adam's step count {model.adam_t} does not match the run's "
                        f"step {plan.step}")
    return model, plan


def new_model(plan, threads):
    """A model for a fresh run, initialised from plan.seed."""
    model = Model(plan.arch, max_batch=plan.batch, threads=threads, precision=plan.precision)
    model.init_params(plan.seed)
    return model


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
    """A progress bar per epoch (loss, rec, KL, β, phase, img/s, ETA) under one for the run, a
    line per finished epoch with its test ELBO, and a summary table at the end."""

    def __init__(self, console=None):
        self.bar = Bar(console=console)
        self.console = self.bar.console
        self.task = None
        self.run_task = None
        self.records = []

    def start(self, trainer):
        plan = trainer.plan
        self.console.print(
            f"[bold]cvae train[/bold] {trainer.run_dir}: {plan.arch.describe()}, {trainer.model.arch.n_params():,} parameters, digits "
            f"{','.join(map(str, plan.digits))} ({len(trainer.train_set):,} train / "
            f"{len(trainer.test_set):,} test images), batch {plan.batch}, lr {plan.lr:g}, "
            f"{plan.schedule.describe()}, {trainer.model.threads} threads, {plan.precision}, "
            f"kernels {trainer.model.kernel_isa}", soft_wrap=True)
        if plan.step:
            self.console.print(f"resuming at epoch {plan.epoch + 1}, batch {plan.batch_in_epoch} "
                               f"(step {plan.step:,})", soft_wrap=True)
        self.bar.start()
        self.run_task = self.bar.add("run", plan.epochs * trainer.batches_per_epoch, plan.step)

    def epoch_start(self, epoch, epochs, start_batch, n_batches):
        self.epochs = epochs
        self._epoch_base = start_batch
        self.task = self.bar.add(f"epoch {epoch + 1}/{epochs}", n_batches, start_batch)

    def progress(self, done, loss, rec, kl, beta, phase, img_per_s):
        stats = (f"{phase} β={beta:.3g} loss {loss:.2f} rec {rec:.2f} KL {kl:.2f} "
                 f"{img_per_s:,.0f} img/s")
        self.bar.update(self.task, completed=done, stats=stats)
        self.bar.update(self.run_task, advance=done - self._epoch_base)
        self._epoch_base = done

    def epoch_end(self, record):
        self.records.append(record)
        if self.task is not None:
            self.bar.remove(self.task)
            self.task = None
        self.bar.update(self.run_task, completed=record["step"])
        self.bar.print(
            f"epoch {record['epoch']}/{self.epochs} {record['phase']} β={record['beta']:.3g} "
            f"lr={record['lr']:.2g}  train {record['train_loss']:.2f}  test -ELBO "
            f"[bold]{record['test_neg_elbo']:.2f}[/bold] (rec {record['test_rec']:.2f}, "
            f"KL {record['test_kl']:.2f})  {record['img_per_s']:,.0f} img/s  "
            f"{record['seconds']:.1f} s")

    def message(self, text):
        self.bar.print(text, markup=False)

    def close(self):
        self.bar.stop()

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
    """Runs a Plan on a Model from the plan's position to the end (or a stop).

    store: where the run is kept (cvae.rundir.RunStore): store.path names it in messages,
    store.save(kind, meta, sections, epoch) saves a checkpoint (epoch None: mid-epoch) and
    returns its path, store.write_metrics(records) rewrites the per-epoch metrics,
    store.has_checkpoint() says whether one was saved. records: the metrics of the epochs the
    plan has done already."""

    def __init__(self, store, model, plan, train_set, test_set, records=(), reporter=None,
                 after_step=None):
        self.store = store
        self.run_dir = store.path
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
        self.records = [r for r in records if r["epoch"] <= plan.epoch]
        expected_step = plan.epoch * self.batches_per_epoch + plan.batch_in_epoch
        if plan.step != expected_step or plan.batch_in_epoch >= self.batches_per_epoch:
            raise CvaeError(
                f"{self.run_dir}: the checkpoint's position (epoch {plan.epoch}, batch "
                f"{plan.batch_in_epoch}, step {plan.step}) does not fit this data "
                f"({self.batches_per_epoch} batches per epoch): was the data set changed?")

    # -- stopping
    def request_stop(self, signum=2):  # SIGINT
        """Finish the current step, save a checkpoint and stop (what SIGINT/SIGTERM do)."""
        self.stop_signal = signum

    # -- saving
    def _save(self, epoch=None):
        if not self.model.finite():
            p = self.plan
            saved = (f"the last good checkpoint is in {self.run_dir}"
                     if self.store.has_checkpoint() else "no checkpoint was saved yet")
            raise CvaeError(f"training diverged by step {p.step} (epoch {p.epoch + 1}): a "
                            f"parameter is not finite; nothing was saved, {saved}: try a lower "
                            f"--lr")
        return self.store.save(KIND, self.plan.meta(self.model.adam_t),
                               self.model.state_sections(), epoch=epoch)

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
                # The fused Adam counts non-finite gradients and parameters as it goes.
                if loss != loss or loss == math.inf or model.nonfinite():
                    saved = (f"the last good checkpoint is in {self.run_dir}"
                             if self.store.has_checkpoint() else "no checkpoint was saved yet")
                    what = (f"loss {loss}" if not math.isfinite(loss) else
                            f"{model.nonfinite()} non-finite gradients or parameters")
                    raise CvaeError(f"training diverged at epoch {e + 1}, step {step} ({what}); "
                                    f"{saved}: try a lower --lr")
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
            self.store.write_metrics(self.records)
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
        result = self._result("complete", 0, self.store.last_checkpoint())
        reporter.finish(self, result)
        return result

    def _result(self, status, code, path):
        p = self.plan
        return Result(status, code, p.epoch, p.batch_in_epoch, p.step, path, list(self.records))

    def _stopped(self, path):
        p = self.plan
        name = signal_name(self.stop_signal)
        where = (f"after epoch {p.epoch}" if not p.batch_in_epoch else
                 f"in epoch {p.epoch + 1} at batch {p.batch_in_epoch}/{self.batches_per_epoch}")
        result = self._result("interrupted", exit_code(self.stop_signal), path)
        self.reporter.finish(self, result)
        print(f"cvae: {name}: stopped {where} (step {p.step:,} of {self.total_steps:,}); saved {path}\n"
              f"cvae: resume with: cvae train --resume {self.run_dir}", file=sys.stderr, flush=True)
        return result
