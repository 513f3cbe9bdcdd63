"""Workflows over a run directory: start or resume a run, finish it (its flow prior, its images,
its evaluation), evaluate a checkpoint, and draw sheets from one. `cvae train`, `cvae prior
train`, `cvae eval`, `cvae generate` ... and `cvae sweep` all go through these, so a run is
finished the same way whoever finishes it.

Functions here take values (paths, numbers, flags), never argparse Namespaces, and print
nothing themselves but progress: what happened comes back as values for the command layer to
print.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

import cvae
from cvae.atomic import check_writable
from cvae.checkpoint import load_checkpoint, save_checkpoint
from cvae.catalogue import CAS_METRICS
from cvae.classifier import SHIPPED, classifier_for, dataset_digest
from cvae.data import Dataset, digits_text
from cvae.errors import CvaeError
from cvae.evaluate import (DEFAULT_K, DEFAULT_SAMPLES, DEFAULT_TEMPERATURE, accuracy_by_digit,
                           evaluate_model, evaluation_work)
from cvae.fetch import ensure_data
from cvae.kernels import build_name
from cvae.prior import DEFAULT_GUIDANCE, DEFAULT_METHOD, DEFAULT_STEPS
from cvae.prior import KIND as PRIOR_KIND
from cvae.progress import Bar, counter
from cvae import rundir as R
from cvae.sheets import (DEFAULT_N, classes_path_for, generate_idx, generated_set,
                         interpolation_sheets, reconstruction_sheet, sample_sheets)
from cvae.signals import stop_on_signals
from cvae.train import KIND as CVAE_KIND
from cvae.train import Trainer, data_description, new_model, restore
from cvae.train_classifier import recipe_of, records_recipe, train_with_recipe
from cvae.train_prior import resume_prior, train_prior


def _stderr(text):
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- starting and resuming


def load_datasets(data_dir, digits):
    return Dataset.load(data_dir, "train", digits), Dataset.load(data_dir, "test", digits)


def start_run(out, plan, data, threads, reporter=None, config_extra=None, say=None,
              notice=None, after_step=None, keep=None):
    """A fresh run of `plan` in `out` (which must not hold one): loads the data (an empty
    cache is fetched first), writes config.json; returns the Trainer. keep: the epoch
    checkpoints kept besides last.cvae, a number or 'all' (None: the default)."""
    keep = _keep(R.DEFAULT_KEEP if keep is None else keep)
    R.check_fresh_run_dir(out, create=False)  # before any data work: fail fast on a clobber
    data_dir, source = ensure_data(data, say=say, notice=notice)
    train_set, test_set = load_datasets(data_dir, plan.digits)
    plan.data = data_description(train_set, test_set)
    R.check_fresh_run_dir(out)
    model = new_model(plan, threads)
    config = {"cvae_version": cvae.__version__, **plan.to_config(),
              "n_params": plan.arch.n_params(), "threads": threads, "kernels": build_name(),
              "isa": model.kernel_isa, "data_dir": os.path.abspath(data_dir),
              "data_source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "keep": keep, **(config_extra or {})}
    R.write_config(out, config)
    return Trainer(R.RunStore(out, keep), model, plan, train_set, test_set, (), reporter,
                   after_step)


def _keep(keep):
    """RunStore's keep: a positive number, or None for 'all'."""
    if keep == "all":
        return None
    if type(keep) is not int or keep <= 0:
        raise CvaeError(f"--keep must be a positive number or 'all', got {keep!r}")
    return keep


def load_resume_point(run_dir, threads):
    """(model, plan, checkpoint path) from a run directory's newest checkpoint."""
    meta, sections, path = R.read_training_checkpoint(run_dir)
    model, plan = restore(meta, sections, path, threads)
    return model, plan, path


def resume_run(run_dir, threads, data_dir, reporter=None, after_step=None, loaded=None,
               keep=None):
    """The Trainer continuing the run in run_dir exactly where its newest checkpoint stopped
    (loaded: load_resume_point's result, when the caller has it). What a killed process left
    half-written is repaired first (rundir.heal). keep: as start_run's; None: the run's own
    (config.json), else the default; a keep given is recorded."""
    model, plan, path = loaded or load_resume_point(run_dir, threads)
    R.heal(run_dir, _stderr)
    config = R.read_config(run_dir)
    if keep is None:
        recorded = config.get("keep", R.DEFAULT_KEEP)
        keep = recorded if recorded is None or (type(recorded) is int and recorded > 0) \
            else R.DEFAULT_KEEP
    else:
        keep = _keep(keep)
        if config and config.get("keep") != keep:
            R.write_config(run_dir, {**config, "keep": keep})
    started_with = config.get("kernels")
    if started_with and started_with != build_name():
        _stderr(f"cvae: warning: {run_dir} was started with the {started_with} kernels and "
                f"continues with {build_name()}: the result will not be bit-identical to an "
                f"uninterrupted run (CVAE_KERNELS={started_with} would be)")
    train_set, test_set = load_datasets(data_dir, plan.digits)
    data = data_description(train_set, test_set)
    if plan.data and plan.data != data:
        raise CvaeError(f"{path} was trained on {plan.data}, but {data_dir} gives {data}")
    records = R.read_metrics(run_dir, upto_epoch=plan.epoch)
    return Trainer(R.RunStore(run_dir, keep), model, plan, train_set, test_set, records,
                   reporter, after_step)


# ---------------------------------------------------------------- the flow prior of a run


def prior_progress(mode, total_steps, first_step, epochs):
    """(on_progress, on_epoch, close) for mode 'rich' (a progress bar on stderr), 'json' (one
    object per epoch on stdout) or 'quiet'."""
    if mode == "json":
        def on_epoch(epoch, loss, seconds):
            print(json.dumps({"prior_epoch": epoch, "loss": loss, "seconds": seconds}),
                  flush=True)
        return None, on_epoch, lambda: None
    if mode != "rich":
        return None, None, lambda: None
    bar = Bar(stderr=True, bar_width=30)
    task = bar.add("flow prior", total_steps, first_step)
    bar.start()

    def on_progress(step, loss, codes_per_s):
        if step % 16 == 0:
            bar.update(task, completed=step, stats=f"loss {loss:.4f} {codes_per_s:,.0f} codes/s")

    def on_epoch(epoch, loss, seconds):
        bar.update(task, completed=epoch * total_steps // epochs)
        bar.print(f"prior epoch {epoch}: loss {loss:.4f} ({seconds:.1f} s)")

    return on_progress, on_epoch, bar.stop


def train_run_prior(run_dir, model, train_set, threads, checkpoint_name, settings=None,
                    resume=False, mode="rich"):
    """Train (or with resume, continue) RUN/prior.cvae for `model` on train_set's codes, with
    a progress display and Ctrl-C/SIGTERM stopping after the current step with the prior
    saved. settings: PriorArch fields hidden, blocks, n_freq, act and train_prior's epochs,
    batch, lr, drop, seed (missing: defaults). Returns (status, trainer, seconds)."""
    start = time.perf_counter()
    save = R.prior_saver(run_dir)
    if resume:
        meta, sections, path = R.read_prior(run_dir)
        trainer = resume_prior(model, train_set, meta, sections, path, save, threads)
    else:
        trainer = train_prior(model, train_set, save, threads=threads,
                              checkpoint_name=checkpoint_name, **dict(settings or {}))
    trainer.path = R.prior_path(run_dir)
    trainer.on_progress, trainer.on_epoch, close = prior_progress(
        mode, trainer.total, trainer.plan.step, trainer.plan.epochs)
    try:
        with stop_on_signals(trainer, _stderr):
            status = trainer.run()
    finally:
        close()
    return status, trainer, time.perf_counter() - start


def complete_run_prior(run_dir, model, train_set, threads, checkpoint_name, settings=None,
                       mode="rich", replace_stale=False):
    """Make RUN/prior.cvae a complete prior of `model`: nothing to do when it is one; a stopped
    one is resumed, a missing one trained (with `settings`, see train_run_prior); one of other
    CVAE parameters is trained anew in its place with replace_stale, else a CvaeError.
    Returns (status, PriorTrainer or None when nothing was done, seconds, the state before)."""
    state, _ = R.prior_state(run_dir, model)
    if state == "complete":
        return "complete", None, 0.0, state
    if state == "stale" and not replace_stale:
        raise R.stale_prior_error(run_dir)
    status, trainer, seconds = train_run_prior(run_dir, model, train_set, threads,
                                               checkpoint_name, settings,
                                               resume=state == "partial", mode=mode)
    return status, trainer, seconds, state


# ---------------------------------------------------------------- finishing a run


@dataclass
class Finish:
    """What a run whose CVAE is complete still needs (cvae train, cvae sweep)."""

    prior: bool = False          # its flow prior, trained or resumed (prior.cvae)
    images: bool = True          # its sheets and pictures (write_run_images)
    flow_sheet: bool = False     # samples-flow.pgm (with images: beside them)
    evaluate: dict = None        # run_eval's options, or None for no evaluation
    prior_settings: dict = None  # train_run_prior's settings of a new prior
    replace_stale: bool = False  # a prior of another checkpoint is trained anew, not an error


@dataclass
class Finished:
    code: int = 0                # non-zero: stopped by a signal, the exit code
    prior_trainer: object = None # the PriorTrainer that ran (None: nothing to train)
    prior_seconds: float = 0.0
    prior_before: str = None     # the prior's state before: none, stale, partial, complete
    evaluation: dict = None


def finish_run(trainer, needs, mode="rich"):
    """Give the complete run of `trainer` what `needs` says, in this order: the flow prior
    (for the run's final checkpoint, opened as 'cvae prior train' opens it), the images (with
    the flow prior's sheet), the evaluation. mode: the prior's progress ('rich', 'json',
    'quiet')."""
    run_dir, threads = trainer.run_dir, trainer.model.threads
    done = Finished()
    if needs.prior:
        final = R.latest_checkpoint(run_dir)
        model, _ = R.open_model(final, threads)
        # A new prior trains in the run's precision.
        settings = {**(needs.prior_settings or {}), "precision": trainer.plan.precision}
        status, prior_trainer, seconds, before = complete_run_prior(
            run_dir, model, trainer.train_set, threads, os.path.basename(final), settings,
            mode=mode, replace_stale=needs.replace_stale)
        done.prior_trainer, done.prior_seconds, done.prior_before = prior_trainer, seconds, before
        if status != "complete":
            done.code = prior_trainer.exit_code()
            return done
    flow = None
    if needs.flow_sheet:
        flow = R.open_prior("flow", run_dir, trainer.model, threads)
    plan = trainer.plan
    if needs.images:
        R.write_run_images(trainer.model, trainer.test_set, run_dir, plan.seed, plan.digits,
                           trainer.records, flow=flow)
    elif flow is not None:
        R.write_flow_samples(trainer.model, run_dir, plan.seed, plan.digits, flow)
    if needs.evaluate is not None:
        done.evaluation = run_eval(run_dir, **needs.evaluate)
    return done


# ---------------------------------------------------------------- evaluation


def run_eval(checkpoint, data=None, k=DEFAULT_K, samples=DEFAULT_SAMPLES,
             temperature=DEFAULT_TEMPERATURE, seed=0, threads=None, classifier=None,
             progress=False, prior=None, steps=None, method=None, guidance=None,
             precision=None, cas=False, cas_size=None):
    """Evaluate a checkpoint (a .cvae file or a run directory) on its digits' test images;
    write eval.json beside it (atomically) and return the result dict (with absolute paths,
    and "eval_json"). `cvae eval` without the printing; `cvae sweep` calls it for every run.

    prior: 'flow', 'gaussian', 'both' (flow first), or None: both when the run has a flow
    prior, else gaussian. steps, method, guidance: the flow's sampling (None: defaults).
    precision: of the CVAE's and the flow's GEMMs (the classifier judges in fp32); None: the
    one the run was trained in.

    cas: also the classification accuracy score of each prior (classification_accuracy_scores:
    by_prior[name]'s cas and cas_per_digit, the first prior's also at the top level, and
    cas_real ...); an explicit precision is its classifiers' too. cas_size: generated digits
    per prior (default: as many as the real training set holds, for tests and quick looks)."""
    if cas_size is not None and (type(cas_size) is not int or cas_size <= 0):
        raise CvaeError(f"the CAS set size must be a positive integer, got {cas_size!r}")
    if k is None or k <= 0:
        raise CvaeError(f"--k must be a positive integer, got {k}")
    if samples is None or samples <= 0:
        raise CvaeError(f"--samples must be a positive integer, got {samples}")
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise CvaeError(f"--temperature must be a finite number >= 0, got {temperature}")
    if seed < 0:
        raise CvaeError(f"--seed must be a non-negative integer, got {seed}")
    path, run_dir = R.resolve_checkpoint(checkpoint)
    out = R.eval_path(path)
    model, meta = R.open_model(path, threads, precision=precision)
    priors = R.open_priors(prior, run_dir, model, model.threads,
                           DEFAULT_STEPS if steps is None else steps, method or DEFAULT_METHOD,
                           DEFAULT_GUIDANCE if guidance is None else guidance)
    digits = R.checkpoint_digits(meta, path)
    test_set = R.load_split(data, digits)
    judge, judge_meta, judge_source = classifier_for(test_set, classifier, model.threads)
    dataset = test_set.restrict(digits)
    if judge is not None and len(dataset) < 4:
        raise CvaeError(f"the FID needs at least 4 test images of digits "
                        f"{digits_text(digits)}; the data has {len(dataset)}")
    if cas:  # the training split and the recipe before any work: fail fast
        train_set = R.load_split(data, digits, split="train").restrict(digits)
        recipe = recipe_of(judge_meta, judge.arch if judge is not None else None, judge_source)
        if precision is not None:
            recipe["precision"] = model.precision
        reference = judge if _judge_is_reference(judge, judge_meta, recipe, train_set,
                                                 test_set) else None
        size = len(train_set) if cas_size is None else cas_size
        if size < recipe["batch"]:
            raise CvaeError(f"--cas: a training set of {size} images of digits "
                            f"{digits_text(digits)} is fewer than one batch "
                            f"({recipe['batch']}) of the classifier's recipe")

    start = time.perf_counter()
    options = dict(classifier=judge, samples=samples, temperature=temperature, priors=priors,
                   relative_to=os.path.dirname(out))
    if progress:
        bar, advance = counter(evaluation_work(len(dataset), k, samples, len(digits),
                                               len(priors), judge is not None),
                               "evaluating (forward passes)")
        with bar:
            metrics = evaluate_model(model, dataset, digits, seed, k, advance=advance, **options)
    else:
        metrics = evaluate_model(model, dataset, digits, seed, k, **options)
    if cas:
        scores = classification_accuracy_scores(
            model, priors, digits, train_set, test_set, recipe, temperature=temperature,
            seed=seed, reference=reference, size=cas_size, progress=progress)
        for name, figures in scores.pop("by_prior").items():
            metrics["by_prior"][name].update(figures)
        metrics.update({key: metrics["by_prior"][priors[0].name][key] for key in CAS_METRICS},
                       **scores)
    seconds = time.perf_counter() - start

    result = {**metrics, "seed": seed, "checkpoint": os.path.abspath(path),
              "digits": list(digits), "precision": model.precision, "threads": model.threads,
              "seconds": seconds}
    if judge is not None:
        result["classifier"] = os.path.abspath(judge_source)
        result["classifier_test_accuracy"] = judge_meta.get("test_accuracy")
    else:
        result["classifier"] = None
        result["classifier_note"] = judge_source
    shipped = judge is not None and os.path.abspath(judge_source) == os.path.abspath(SHIPPED)
    R.write_eval(out, result, classifier_shipped=shipped)
    result["eval_json"] = out
    return result


# ---------------------------------------------------------------- the classification accuracy score


def _judge_is_reference(judge, meta, recipe, train_set, test_set):
    """Whether the judging classifier is what the CAS's real reference would train: its header
    records the whole recipe (in the recipe's precision), and that it was trained on as many
    images as train_set holds (all of the run's digits) and measured on this test set."""
    return (judge is not None and records_recipe(meta)
            and meta.get("precision", "fp32") == recipe["precision"]
            and meta.get("train_images") == len(train_set)
            and meta.get("test_digest") == dataset_digest(test_set))


def cas_counts(train_set, digits, size=None):
    """Generated digits of each digit for the CAS: the real training set's counts, or `size`
    in the same proportions (largest remainders)."""
    counts = np.bincount(np.asarray(train_set.labels), minlength=10)[list(digits)]
    if size is None:
        return [int(c) for c in counts]
    share = counts * size / counts.sum()
    out = np.floor(share).astype(np.int64)
    out[np.argsort(out - share, kind="stable")[:size - int(out.sum())]] += 1
    return [int(c) for c in out]


def classification_accuracy_scores(model, priors, digits, train_set, test_set, recipe,
                                   temperature=DEFAULT_TEMPERATURE, seed=0, reference=None,
                                   size=None, progress=False):
    """The classification accuracy score (Ravuri & Vinyals 2019) of each prior's generated
    digits: a labelled set with train_set's digit counts (cas_counts; train_set: the real
    training images of `digits`) drawn at `temperature` from KeyedNormals(seed), as `cvae
    generate --format idx` draws (cvae.sheets.generated_set), trains a fresh classifier with
    `recipe` (cvae.train_classifier.recipe_of) on the model's threads; its accuracy on
    test_set's images of `digits` (accuracy_by_digit) is the CAS. The real reference is the
    same recipe trained on train_set, or `reference` (a classifier trained so already).

    Returns {"by_prior": {name: {cas, cas_per_digit}}, cas_real, cas_real_per_digit,
    cas_images, cas_recipe, cas_real_source, cas_seconds}. progress: a bar on stderr, and a
    line for each classifier trained."""
    start = time.perf_counter()
    counts = cas_counts(train_set, digits, size)
    total, epochs = sum(counts), recipe["epochs"]
    bar = Bar(stderr=True, transient=True, bar_width=30) if progress else None

    def trained(data, what):
        """A classifier trained by the recipe on data, with a bar of its epochs."""
        began = time.perf_counter()
        task = bar.add(f"CAS: training on {what}", epochs) if bar else None
        on_epoch = ((lambda epoch, loss: bar.update(task, completed=epoch,
                                                    stats=f"loss {loss:.4f}")) if bar else None)
        classifier = train_with_recipe(data, recipe, model.threads, on_epoch)
        if bar:
            bar.remove(task)
        return classifier, time.perf_counter() - began

    def say(text):
        if bar:
            bar.print(text, markup=False)

    result = {"by_prior": {}}
    if bar:
        bar.start()
    try:
        for prior in priors:
            began = time.perf_counter()
            task = bar.add(f"CAS: generating ({prior.name})", total) if bar else None
            images, labels = generated_set(
                model, digits, counts, temperature, seed, prior,
                progress=(lambda done, _: bar.update(task, completed=done)) if bar else None)
            if bar:
                bar.remove(task)
            generating = time.perf_counter() - began
            classifier, training = trained(Dataset(images, labels, f"{prior.name} digits"),
                                           f"{total:,} {prior.name} digits")
            del images, labels
            accuracy, per_digit = accuracy_by_digit(classifier, test_set, digits)
            result["by_prior"][prior.name] = {"cas": accuracy, "cas_per_digit": per_digit}
            say(f"CAS of the {prior.name} prior: {100 * accuracy:.2f}% (generating "
                f"{generating:.1f} s, training {training:.1f} s)")
        if reference is None:
            reference, training = trained(train_set, f"{len(train_set):,} real digits")
            source = "trained"
        else:
            source, training = "judge", None
        accuracy, per_digit = accuracy_by_digit(reference, test_set, digits)
        say(f"CAS of real digits: {100 * accuracy:.2f}% "
            + (f"(training {training:.1f} s)" if training is not None
               else "(the judging classifier, trained so)"))
    finally:
        if bar:
            bar.stop()
    result.update({"cas_real": accuracy, "cas_real_per_digit": per_digit, "cas_images": total,
                   "cas_recipe": recipe, "cas_real_source": source,
                   "cas_seconds": time.perf_counter() - start})
    return result


# ---------------------------------------------------------------- sheets of a checkpoint


def _positive(value, option):
    if value is None or value <= 0:
        raise CvaeError(f"{option} must be a positive integer, got {value}")
    return value


def _open(checkpoint, out, default_name, threads, seed, precision=None):
    """(checkpoint path, run dir, output sheet, model, meta) for a sheet command."""
    if seed < 0:
        raise CvaeError(f"--seed must be a non-negative integer, got {seed}")
    if threads is not None:
        _positive(threads, "--threads")
    path, run_dir = R.resolve_checkpoint(checkpoint)
    out = R.sheet_path(out, run_dir, default_name)
    model, meta = R.open_model(path, threads, precision=precision)
    return path, run_dir, out, model, meta


@dataclass
class Sheets:
    """What a sheet command wrote: its paths, the checkpoint, and how many digits."""

    paths: list
    checkpoint: str
    digits: tuple
    count: int = 0
    seconds: float = 0.0          # sampling and decoding
    total_seconds: float = 0.0    # with writing the sheets
    threads: int = 1
    prior: object = None
    precision: str = "fp32"


def generate(checkpoint, out=None, digits=None, per_digit=10, temperature=1.0, cols=None,
             max_rows=50, seed=0, threads=None, prior=None, steps=None, method=None,
             guidance=None, shard=None, idx=False, split="train", progress=None,
             precision=None):
    """`cvae generate`: class-conditional sample sheets of the checkpoint's prior (see
    sheets.sample_sheets), or with idx an MNIST-format data set in the directory `out`
    (sheets.generate_idx). shard (cvae.shard.Shard): only that shard's whole sheets, or its
    part of the rows. progress(done, total) after each sheet or block of rows. precision: of
    the decoder's and the flow's GEMMs (fp32, bf16, or auto: bf16 where it is faster; None:
    the one the run was trained in)."""

    _positive(per_digit, "--per-digit")
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise CvaeError(f"--temperature must be a finite number >= 0, got {temperature}")
    if cols is not None:
        _positive(cols, "--cols")
    _positive(max_rows, "--max-rows")
    if idx:
        out = idx_output_dir(out)
        path, run_dir, _, model, meta = _open(checkpoint, None, "generate.pgm", threads, seed,
                                              precision)
    else:
        path, run_dir, out, model, meta = _open(checkpoint, out, "generate.pgm", threads, seed,
                                                precision)
    sampler = R.open_prior(prior, run_dir, model, model.threads,
                           DEFAULT_STEPS if steps is None else steps, method or DEFAULT_METHOD,
                           DEFAULT_GUIDANCE if guidance is None else guidance)
    trained = R.checkpoint_digits(meta, path)
    if digits is not None:
        R.check_digits(digits, trained, path)
    digits = trained if digits is None else tuple(digits)
    start = time.perf_counter()
    if idx:
        paths, n, seconds = generate_idx(
            model, digits, out, per_digit=per_digit, temperature=temperature, seed=seed,
            split=split, extra={"checkpoint": R.portable(path, out),
                                "precision": model.precision}, prior=sampler,
            shard=shard, progress=progress)
    else:
        paths, n, seconds = sample_sheets(
            model, digits, out, per_digit=per_digit, temperature=temperature, seed=seed,
            cols=cols, max_rows=max_rows,
            extra={"checkpoint": R.portable(path, os.path.dirname(os.path.abspath(out))),
                   "precision": model.precision},
            prior=sampler, shard=shard, progress=progress)
    return Sheets(paths, path, digits, n, seconds, time.perf_counter() - start, model.threads,
                  sampler, model.precision)


def idx_output_dir(out):
    """--out DIR for --format idx, checked before any work: a writable directory, or one that
    can be made there (generate_idx makes it)."""
    if not out:
        raise CvaeError("--format idx needs --out DIR (the directory for the data set)")
    out = os.fspath(out)
    if not os.path.isdir(out):
        if os.path.exists(out):
            raise CvaeError(f"--out {out} is not a directory (--format idx writes a directory)")
        check_writable(out)  # its parent exists and is writable
    elif not os.access(out, os.W_OK | os.X_OK):
        raise CvaeError(f"cannot write in {out}: the directory is not writable")
    return out


def reconstruct(checkpoint, out=None, n=DEFAULT_N, seed=0, threads=None, data=None):
    """`cvae reconstruct`: test digits beside their reconstructions."""
    _positive(n, "--n")
    path, run_dir, out, model, meta = _open(checkpoint, out, "reconstruct.pgm", threads, seed)
    digits = R.checkpoint_digits(meta, path)
    dataset = R.load_split(data, digits)
    paths, k = reconstruction_sheet(model, dataset, digits, out, n=n, seed=seed,
                                    extra={"checkpoint": R.portable(path, os.path.dirname(out))})
    return Sheets(paths, path, digits, k, threads=model.threads)


def interpolate(checkpoint, out=None, steps=10, pairs=5, seed=0, threads=None, data=None):
    """`cvae interpolate`: latent walks between test digits, and one z across every digit."""
    _positive(steps, "--steps")
    if steps < 2:
        raise CvaeError(f"--steps must be at least 2 (the two endpoints), got {steps}")
    _positive(pairs, "--pairs")
    path, run_dir, out, model, meta = _open(checkpoint, out, "interpolate.pgm", threads, seed)
    digits = R.checkpoint_digits(meta, path)
    dataset = R.load_split(data, digits)
    paths = interpolation_sheets(model, dataset, digits, out, classes_path_for(out),
                                 steps=steps, pairs=pairs, seed=seed,
                                 extra={"checkpoint": R.portable(path, os.path.dirname(out))})
    return Sheets(paths, path, digits, pairs, threads=model.threads)


# ---------------------------------------------------------------- export


def export(checkpoint, out, with_prior=False):
    """Write the weights of a checkpoint (a .cvae file, or a run directory's newest) to `out`,
    without Adam's state: a file `generate`, `eval`, `reconstruct`, `interpolate` and
    `report` take like the run's own, a third of the size. with_prior: the run's complete
    flow prior of that checkpoint too, as prior.cvae beside `out` (weights only). Existing
    files are never replaced. Returns the paths written."""
    out = os.fspath(out)
    if not out.endswith(".cvae"):
        raise CvaeError(f"--out {out}: an exported model is a .cvae file")
    path, run_dir = R.resolve_checkpoint(checkpoint)
    targets = [out] + ([os.path.join(os.path.dirname(os.path.abspath(out)), R.PRIOR)]
                       if with_prior else [])
    for target in targets:
        check_writable(target)
        if os.path.exists(target):
            raise CvaeError(f"{target} exists: export never replaces a file; choose another "
                            f"--out or delete it")
    meta, sections, _ = load_checkpoint(path, expected_kind=CVAE_KIND)
    if with_prior:
        model, _ = R.open_model(path, threads=1, batch=16)
        state, _ = R.prior_state(run_dir, model)
        if state != "complete":
            raise CvaeError(f"{run_dir} has no complete flow prior of {os.path.basename(path)} "
                            f"({state}): export without --with-prior, or train it first with "
                            f"'cvae prior train --checkpoint {run_dir}'")
    weights = {name: array for name, array in sections.items() if name.startswith("param.")}
    save_checkpoint(out, CVAE_KIND, {**meta, "exported_from": os.path.basename(path)}, weights)
    if with_prior:
        prior_meta, prior_sections, _ = R.read_prior(run_dir)
        save_checkpoint(targets[1], PRIOR_KIND, prior_meta,
                        {n: a for n, a in prior_sections.items() if n.startswith("param.")})
    return targets
