"""The fuzz targets: one check(data) per reader of untrusted files.

Each check writes the fuzzer's bytes where the reader expects a file, reads it the way a
command does, and then uses what it read. It returns normally when the reader either gave a
sane result or refused the input with a CvaeError (the one-line `cvae: error:` of the CLI);
anything else it lets escape (any other exception, or an AssertionError for a result that is
not sane), which is what the fuzzer reports as a crash and pytest as a failure.

Used by tests/fuzz/fuzz.py (atheris, coverage-guided) and tests/fuzz/test_fuzz_corpus.py
(replays every file of tests/fuzz/corpus/<target>/ under plain pytest). The seed corpus is
made by tests/fuzz/make_corpus.py.

Targets: idx, pgm, checkpoint_cvae, checkpoint_prior, checkpoint_classifier, and
rundir_json (config.json, metrics.jsonl, eval.json and sheet sidecars, read by cvae.rundir and
shown by the report).
"""

import gzip
import hashlib
import json
import os
import random
import struct
import tempfile

import numpy as np

# The training checks of each kind register themselves on import (cvae.checkpoint's
# KIND_CHECKS): load them as every command does.
import cvae.train  # noqa: F401
import cvae.train_prior  # noqa: F401
from cvae.checkpoint import ALIGNMENT, DIGEST_SIZE, MAGIC
from cvae.errors import CvaeError

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# One scratch directory per process: the readers take paths, not bytes.
_SCRATCH = tempfile.mkdtemp(prefix="cvae-fuzz-")


# Set by make_corpus.py: a seed must be read without an error, so it reaches the deepest code.
STRICT = False


def _refused():
    if STRICT:
        raise


def _scratch(name, data):
    path = os.path.join(_SCRATCH, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------- IDX (cvae/data.py)

IDX_NAMES = ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")


def check_idx(data):
    """The first byte picks the reader (images below 3, else labels) and how the rest reaches
    it: % 3 == 0 a raw file, 1 gzipped by us (the IDX parser behind the gzip path), 2 as it
    is under a .gz name (a damaged gzip stream)."""
    if not data:
        return
    mode, labels_file, payload = data[0] % 3, data[0] % 6 >= 3, data[1:]
    if mode == 1:
        payload = gzip.compress(payload, mtime=0)
    path = _scratch(IDX_NAMES[mode != 0], payload)
    from cvae.data import NUM_DIGITS, PIXELS_PER_IMAGE, read_idx_images, read_idx_labels

    try:
        if labels_file:
            labels = read_idx_labels(path)
            assert labels.dtype == np.uint8 and labels.ndim == 1
            assert not labels.size or int(labels.max()) < NUM_DIGITS
        else:
            images = read_idx_images(path)
            assert images.dtype == np.uint8 and images.ndim == 2
            assert images.shape[1] == PIXELS_PER_IMAGE
            int(images.sum())  # every byte of the mapping is really there
    except CvaeError:
        _refused()


# ---------------------------------------------------------------- PGM (cvae/images.py)


def check_pgm(data):
    from cvae.images import read_pgm

    path = _scratch("sheet.pgm", data)
    try:
        image = read_pgm(path)
    except CvaeError:
        return _refused()
    assert image.dtype == np.uint8 and image.ndim == 2 and image.size > 0


# ---------------------------------------------------------------- checkpoints (cvae/checkpoint.py)
#
# The fuzzer's bytes are a checkpoint without its trailing SHA-256; the check appends the
# digest of whatever the fuzzer made (reseals it), so every mutation reaches the structure and
# the architecture checks behind the checksum instead of dying at it.

TINY_CVAE = {"h1": 2, "h2": 3, "latent": 3, "act": "elu"}
DECODE_BATCH = 12


def reseal(body):
    return body + hashlib.sha256(body).digest()


def _decode_finite(model, digits, rng):
    labels = np.array([digits[i % len(digits)] for i in range(DECODE_BATCH)], dtype=np.uint8)
    z = rng.standard_normal((DECODE_BATCH, model.arch.latent)).astype(np.float32)
    probs = model.decode(z, labels)
    assert probs.shape == (DECODE_BATCH, model.arch.x_dim)
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1


def check_checkpoint_cvae(data):
    """What generate, eval and train --resume do with a CVAE checkpoint, up to one decoded
    batch."""
    from cvae.model import model_from_checkpoint
    from cvae.rundir import checkpoint_digits

    path = _scratch("last.cvae", reseal(data))
    try:
        model, meta = model_from_checkpoint(path, max_batch=DECODE_BATCH)
        if "epochs" in meta:
            from cvae.train import Plan

            Plan.from_meta(meta, path)  # train --resume's reading of the position
        _decode_finite(model, checkpoint_digits(meta, path), np.random.default_rng(0))
    except CvaeError:
        _refused()


_PRIOR_WORLD = {}


def prior_world():
    """The tiny CVAE every prior seed was trained for (the same bits every time)."""
    if not _PRIOR_WORLD:
        from cvae.model import Arch, Model

        model = Model(Arch(**TINY_CVAE), max_batch=DECODE_BATCH)
        model.init_params(1)
        _PRIOR_WORLD["model"] = model
    return _PRIOR_WORLD["model"]


def check_checkpoint_prior(data):
    """What generate --prior flow does with a run's prior.cvae, up to one decoded batch."""
    from cvae.prior import FlowSampler, load_prior

    model = prior_world()
    path = _scratch("prior.cvae", reseal(data))
    try:
        prior, _ = load_prior(path, model)
        sampler = FlowSampler(prior, path, model.arch.latent)
        labels = np.arange(DECODE_BATCH, dtype=np.uint8) % 10
        z = sampler.draw(labels, np.random.default_rng(0), 1.0)
        assert z.shape == (DECODE_BATCH, model.arch.latent)
        probs = model.decode(z, labels)
        assert np.isfinite(probs).all()
    except CvaeError:
        _refused()


def check_checkpoint_classifier(data):
    """What eval does with a --classifier file, up to one batch of predictions."""
    from cvae.classifier import load_classifier

    path = _scratch("classifier.cvae", reseal(data))
    try:
        model, _ = load_classifier(path)
        images = np.random.default_rng(0).integers(0, 256, (DECODE_BATCH, 784), dtype=np.uint8)
        logits, features = model.predict(images)
        assert logits.shape == (DECODE_BATCH, 10) and features.shape[0] == DECODE_BATCH
        assert np.isfinite(logits).all() and np.isfinite(features).all()
    except CvaeError:
        _refused()


# A structure-aware mutator for checkpoints: a byte-level mutation mostly breaks the JSON
# header, so most of the time one value of the header (a size, a shape, a digit, a key) or a
# few floats of the payload are replaced with values that are likely to hurt instead.

_PREFIX = struct.Struct("<8sIQ")
_NASTY_VALUES = [0, -1, 1, 2, 3, 9, 10, 11, 16, 255, 256, 784, 794, 1 << 15, (1 << 15) + 1,
                 1 << 16, (1 << 16) + 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**9, 10**30,
                 0.5, -0.0, 1.5, 1e-45, 1e308, float("nan"), float("inf"), "", "x", "elu",
                 "relu", "cvae", "prior", "classifier", None, True, False, [], {}, [0], [1, 1]]
_NASTY_FLOATS = np.array([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e30, 1e-45, -0.0, 0.0,
                          -1.0, 1e6], dtype="<f4")


def split_body(body):
    """(version, header dict, data area) of a checkpoint body, or None if it does not parse."""
    if len(body) < _PREFIX.size:
        return None
    magic, version, length = _PREFIX.unpack_from(body)
    if magic != MAGIC or _PREFIX.size + length > len(body):
        return None
    try:
        header = json.loads(body[_PREFIX.size:_PREFIX.size + length])
    except (ValueError, RecursionError):
        return None
    start = -(-(_PREFIX.size + length) // ALIGNMENT) * ALIGNMENT
    return version, header, body[start:]


def join_body(version, header, data_area):
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = _PREFIX.pack(MAGIC, version, len(header_bytes)) + header_bytes
    return head + bytes(-len(head) % ALIGNMENT) + data_area


def _slots(value):
    """Every (container, key) of a JSON value, depth first."""
    if isinstance(value, dict):
        for key in list(value):
            yield value, key
            yield from _slots(value[key])
    elif isinstance(value, list):
        for i in range(len(value)):
            yield value, i
            yield from _slots(value[i])


def _mutate_header(header, rng):
    slots = list(_slots(header))
    if not slots:
        return
    container, key = rng.choice(slots)
    old = container[key]
    how = rng.random()
    if how < 0.1 and isinstance(container, dict):
        del container[key]
    elif how < 0.15 and isinstance(container, list):
        container.extend([old] * rng.choice([1, 1, 2, 40]))  # 40: past numpy's dimensions
    elif how < 0.45 and type(old) is int:
        container[key] = rng.choice([old + 1, old - 1, old * 2, old + 64, -old, old * 1000,
                                     old // 2])
    else:
        container[key] = rng.choice(_NASTY_VALUES)


def _mutate_payload(data_area, rng):
    floats = len(data_area) // 4
    if floats == 0:
        return data_area
    array = np.frombuffer(data_area[:4 * floats], dtype="<f4").copy()
    for _ in range(rng.choice([1, 1, 1, 2, 5])):
        array[rng.randrange(floats)] = _NASTY_FLOATS[rng.randrange(len(_NASTY_FLOATS))]
    return array.tobytes() + data_area[4 * floats:]


def mutate_checkpoint(data, max_size, seed, byte_mutate):
    """A custom mutator for atheris: byte_mutate is atheris.Mutate."""
    rng = random.Random(seed)
    parsed = split_body(data) if rng.random() < 0.8 else None
    if parsed is None:
        return byte_mutate(data, max_size)
    version, header, data_area = parsed
    what = rng.random()
    if what < 0.6:
        _mutate_header(header, rng)
    if what >= 0.4:
        data_area = _mutate_payload(data_area, rng)
    try:
        body = join_body(version, header, data_area)
    except ValueError:  # a value json cannot write
        return byte_mutate(data, max_size)
    return body[:max_size]


# ---------------------------------------------------------------- the run directory's JSON files


#: The first byte of an input picks which of a run's JSON files the rest is.
RUN_JSON = ("config.json", "metrics.jsonl", "eval.json", "samples.json")


def check_rundir_json(data):
    """A run directory holding one fuzzed JSON file (config.json, metrics.jsonl, eval.json or
    a sheet's sidecar), read the way the commands read it (cvae.rundir) and shown the way the
    report shows it: sane values, or a damaged file named, never a crash."""
    if not data:
        return
    from cvae import report
    from cvae import rundir as R
    from cvae.prior import PRIORS

    name = RUN_JSON[data[0] % len(RUN_JSON)]
    run = os.path.join(_SCRATCH, "run")
    os.makedirs(run, exist_ok=True)
    for old in os.listdir(run):
        os.unlink(os.path.join(run, old))
    with open(os.path.join(run, name), "wb") as f:
        f.write(data[1:])
    page = report.Report(run)
    try:
        if name == "config.json":
            config = R.read_config(run)
            assert isinstance(config, dict)
            assert R.recorded_prior(run) in PRIORS
            assert R.recorded_data_dir(run) is None or isinstance(R.recorded_data_dir(run), str)
            report._config_section(page, *R.read_json(os.path.join(run, name)))
        elif name == "metrics.jsonl":
            problems = []
            records = R.read_metrics(run, problems=problems)
            assert all(isinstance(r, dict) and type(r["epoch"]) is int for r in records)
            assert all(isinstance(p, str) for p in problems)
            report._training_section(page, records)
        elif name == "eval.json":
            evaluation, problem = R.read_eval(run)
            assert evaluation is None or all(isinstance(f, dict)
                                              for f in evaluation["by_prior"].values())
            report._metrics_section(page, evaluation, problem, run)
            for prior in PRIORS:
                report._prior_figures(evaluation, prior, run)
            why = R.eval_problem(run, 30, wanted={"seed": 0, "classifier": None},
                                 priors=PRIORS, flow={"steps": 2})
            assert why is None or isinstance(why, str)
        else:
            sidecar, problem = R.read_json(os.path.join(run, name))
            report._sheet_figure(page, "samples.pgm", np.zeros((28, 28), np.uint8), sidecar,
                                 problem)
    except CvaeError:
        _refused()


TARGETS = {
    "idx": check_idx,
    "pgm": check_pgm,
    "checkpoint_cvae": check_checkpoint_cvae,
    "checkpoint_prior": check_checkpoint_prior,
    "checkpoint_classifier": check_checkpoint_classifier,
    "rundir_json": check_rundir_json,
}
CUSTOM_MUTATORS = {name: mutate_checkpoint for name in TARGETS if name.startswith("checkpoint_")}


def corpus_files(target):
    directory = os.path.join(CORPUS, target)
    return sorted(os.path.join(directory, name) for name in os.listdir(directory))
