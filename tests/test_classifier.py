"""The project's digit classifier (cvae/classifier.py, cvae._kernels.Classifier).

- the float64 NumPy reference (tests/reference.py) against central finite differences;
- the kernels' loss, activations and gradients against the reference, and against finite
  differences of the kernels' own float32 loss;
- fused Adam against the reference's Adam; training deterministic across thread counts;
- the random shifts against a slow per-image version;
- the shipped classifier: small, loadable, >= 98.5% on the real MNIST test set (CVAE_DATA);
- the `cvae classifier` commands and their bad input.
"""

import json
import os

import numpy as np
import pytest

from cvae import cli
from cvae import classifier as C
from cvae.data import Dataset
from cvae import rundir as RD
from cvae import train_classifier as TC
from . import reference as R
from .conftest import REAL, needs_real_data, params64, write_split
TINY = C.ClassifierArch(h1=24, h2=20, act="elu")  # not multiples of 16


def make_classifier(arch, max_batch, threads=1, seed=0):
    model = C.DigitClassifier(arch, max_batch=max_batch, threads=threads)
    model.init_params(seed)
    for k, v in R.classifier_init_params(arch.h1, arch.h2, seed=seed + 1).items():
        model.params[k][...] = v
    return model


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("act", ["elu", "relu"])
def test_reference_matches_finite_differences(act):
    p = R.classifier_init_params(12, 8, seed=2)
    pixels = R.digit_like_pixels(6, seed=2)
    labels = R.random_labels(6, seed=2)
    _, grads, _ = R.classifier_forward_backward(p, pixels, labels, act)
    rng = np.random.default_rng(0)
    h = 1e-6
    bad = []
    for k in R.CLASSIFIER_PARAMS:
        for _ in range(6):
            idx = tuple(int(rng.integers(0, s)) for s in p[k].shape)
            q = {kk: v.copy() for kk, v in p.items()}
            q[k][idx] += h
            lp = R.classifier_forward_backward(q, pixels, labels, act)[0]
            q[k][idx] -= 2 * h
            lm = R.classifier_forward_backward(q, pixels, labels, act)[0]
            fd = (lp - lm) / (2 * h)
            if not abs(fd - grads[k][idx]) <= 1e-6 * abs(fd) + 1e-8:
                bad.append(f"{k}{idx}: analytic {grads[k][idx]:.9g}, fd {fd:.9g}")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("arch,batch", [(TINY, 5), (C.ClassifierArch(act="elu"), 64),
                                        (C.ClassifierArch(), 37)])
def test_kernels_match_reference(arch, batch):
    model = make_classifier(arch, max_batch=64)
    pixels = R.digit_like_pixels(batch, seed=batch)
    labels = R.random_labels(batch, seed=batch)
    p = params64(model)
    loss = model.forward_backward(pixels, labels)
    ref_loss, ref_grads, ref_acts = R.classifier_forward_backward(p, pixels, labels, arch.act)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-6, (loss, ref_loss)
    problems = [R.mismatch(f"grad {k}", model.grads[k], ref_grads[k])
                for k in R.CLASSIFIER_PARAMS]
    problems += [R.mismatch(f"act {k}", model.acts[k], ref_acts[k]) for k in ref_acts]
    logits, features = model.predict(pixels)
    problems += [R.mismatch("predict logits", logits, ref_acts["logits"]),
                 R.mismatch("predict features", features, ref_acts["fc2"])]
    problems = [m for m in problems if m]
    assert not problems, "\n".join(problems)


def test_kernel_grads_match_kernel_finite_differences():
    """Central differences of the float32 kernel loss (a mean cross-entropy of size ~2, so its
    rounding noise is ~1e-7) along the largest-gradient entries and a random direction."""
    model = make_classifier(TINY, max_batch=8)
    pixels = R.digit_like_pixels(7, seed=4)
    labels = R.random_labels(7, seed=4)
    model.forward_backward(pixels, labels)
    noise = 16 * float(np.spacing(np.float32(3.0)))
    bad = R.kernel_fd_mismatches(model, lambda: model.forward_backward(pixels, labels),
                                 R.CLASSIFIER_PARAMS, noise)
    assert not bad, "\n".join(bad)


def test_fused_adam_matches_reference_adam():
    model = make_classifier(TINY, max_batch=16)
    pixels = R.digit_like_pixels(9, seed=8)
    labels = R.random_labels(9, seed=8)
    p = params64(model)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    t = 0
    for _ in range(3):
        _, grads, _ = R.classifier_forward_backward(params64(model), pixels, labels, TINY.act)
        p, m, v, t = R.adam(params64(model), grads, m, v, t, 1e-3)
        model.train_step(pixels, labels, 1e-3)
        problems = [R.mismatch(f"param {k}", model.params[k], p[k], rtol=1e-5)
                    for k in R.CLASSIFIER_PARAMS]
        problems = [x for x in problems if x]
        assert not problems, "\n".join(problems)


def test_arrays_that_do_not_fit_are_refused_before_the_kernels_write():
    """Bounds checks are off inside the kernels: every entry point checks its arrays."""
    model = make_classifier(TINY, max_batch=16)
    pixels = R.digit_like_pixels(20, seed=1)
    with pytest.raises(ValueError, match="does not fit"):
        model.net.step(pixels, np.zeros(20, dtype=np.uint8), 0.0, 0)
    with pytest.raises(ValueError, match="pixels must be"):
        model.net.step(np.zeros((4, 783), dtype=np.uint8), np.zeros(4, dtype=np.uint8), 0.0, 0)
    with pytest.raises(ValueError, match="labels"):
        model.net.step(pixels[:4], np.zeros(3, dtype=np.uint8), 0.0, 0)
    logits = np.zeros((4, 10), dtype=np.float32)
    features = np.zeros((4, TINY.h2), dtype=np.float32)
    with pytest.raises(ValueError, match="logits_out"):
        model.net.forward(pixels[:5], logits, np.zeros((5, TINY.h2), dtype=np.float32))
    with pytest.raises(ValueError, match="features_out"):
        model.net.forward(pixels[:4], logits, np.zeros((4, TINY.h2 - 1), dtype=np.float32))
    model.net.forward(pixels[:4], logits, features)  # the right sizes pass


def test_labels_outside_the_classes_are_refused():
    model = make_classifier(TINY, max_batch=8)
    with pytest.raises(ValueError, match="label 10"):
        model.forward_backward(R.digit_like_pixels(2), np.array([3, 10], dtype=np.uint8))


# ---------------------------------------------------------------- training


def slow_shift(pixels, dy, dx):
    out = np.zeros((28, 28), dtype=np.uint8)
    src = pixels.reshape(28, 28)
    for r in range(28):
        for c in range(28):
            if 0 <= r - dy < 28 and 0 <= c - dx < 28:
                out[r, c] = src[r - dy, c - dx]
    return out.ravel()


def test_shifts_match_a_per_image_version():
    pixels = R.digit_like_pixels(12, seed=3)
    got = TC.shifted(pixels, np.random.default_rng(5))
    dy, dx = np.random.default_rng(5).integers(-2, 3, size=(2, 12, 1, 1))
    for i in range(12):
        assert np.array_equal(got[i], slow_shift(pixels[i], int(dy[i, 0, 0]), int(dx[i, 0, 0])))
    assert (dy != 0).any() and (dx != 0).any()


def synthetic_set(n, seed):
    from .test_evaluate import synthetic_digits

    labels = np.arange(n) % 10
    images, labels = synthetic_digits(labels, np.random.default_rng(seed))
    return Dataset(images, labels, "synthetic")


def test_training_is_deterministic_for_any_thread_count_and_learns():
    train = synthetic_set(640, 0)
    test = synthetic_set(200, 1)
    arch = C.ClassifierArch(h1=64, h2=32)
    a = TC.train_classifier(train, epochs=3, batch=32, lr=3e-3, seed=3, threads=1,
                           arch=arch)
    b = TC.train_classifier(train, epochs=3, batch=32, lr=3e-3, seed=3, threads=2,
                           arch=arch)
    c = TC.train_classifier(train, epochs=3, batch=32, lr=3e-3, seed=4, threads=2,
                           arch=arch)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params)
    assert a.accuracy(test) > 0.9


# ---------------------------------------------------------------- files and the shipped classifier


def test_save_and_load_round_trip(tmp_path):
    model = make_classifier(TINY, max_batch=8)
    C.save_classifier(tmp_path / "c.cvae", model, {"test_accuracy": 0.5})
    loaded, meta = C.load_classifier(str(tmp_path / "c.cvae"))
    assert meta["test_accuracy"] == 0.5 and loaded.arch == TINY
    for k in model.params:
        assert np.array_equal(model.params[k], loaded.params[k])


def test_the_shipped_classifier_is_small_and_loads():
    assert os.path.getsize(C.SHIPPED) < 4 * 2 ** 20
    model, meta = C.load_classifier(C.SHIPPED)
    assert model.arch == C.ClassifierArch()
    assert meta["test_accuracy"] >= 0.985 and len(meta["test_digest"]) == 64


@needs_real_data
def test_the_shipped_classifier_reaches_98_5_percent_on_mnist():
    test = Dataset.load(REAL, "test")
    model, meta = C.load_classifier(C.SHIPPED, threads=2)
    assert meta["test_digest"] == C.dataset_digest(test)
    accuracy = model.accuracy(test)
    assert accuracy >= 0.985, accuracy
    found, _, source = C.classifier_for(test)
    assert found is not None and source == C.SHIPPED


def test_other_data_gets_no_default_classifier():
    found, meta, reason = C.classifier_for(synthetic_set(50, 2))
    assert found is None and meta is None and "cvae classifier train" in reason


# ---------------------------------------------------------------- commands


@pytest.fixture
def idx_dir(tmp_path):
    train, test = synthetic_set(320, 0), synthetic_set(100, 1)
    d = tmp_path / "data"
    d.mkdir()
    write_split(d, "train", train.images, train.labels)
    return write_split(d, "t10k", test.images, test.labels)


def test_train_and_eval_commands(idx_dir, tmp_path, capsys):
    out = tmp_path / "clf.cvae"
    assert cli.main(["classifier", "train", "--data", str(idx_dir), "--out", str(out),
                     "--epochs", "2", "--batch", "32", "--threads", "2", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x.get("epoch") for x in lines[:2]] == [1, 2]
    assert lines[-1]["classifier"] == str(out) and 0 <= lines[-1]["test_accuracy"] <= 1
    assert cli.main(["classifier", "eval", "--classifier", str(out), "--data", str(idx_dir),
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_accuracy"] == pytest.approx(lines[-1]["test_accuracy"])
    assert set(result["test_accuracy_per_digit"]) == {str(d) for d in range(10)}


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cvae: error: "), err
    return err[0]


def test_bad_input(idx_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged.cvae"
    damaged.write_bytes(open(C.SHIPPED, "rb").read()[:5000])
    assert cli.main(["classifier", "eval", "--classifier", str(damaged),
                     "--data", str(idx_dir)]) == 2
    assert "damaged.cvae" in one_error_line(capsys)
    assert cli.main(["classifier", "eval", "--classifier", str(tmp_path / "none.cvae"),
                     "--data", str(idx_dir)]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert cli.main(["classifier", "train", "--data", str(idx_dir), "--out", str(tmp_path),
                     "--epochs", "1"]) == 2
    assert "directory" in one_error_line(capsys)
    assert cli.main(["classifier", "train", "--data", str(idx_dir), "--out",
                     str(tmp_path / "missing" / "c.cvae"), "--epochs", "1"]) == 2
    one_error_line(capsys)
    assert cli.main(["classifier", "train", "--data", str(idx_dir), "--out",
                     str(tmp_path / "c.cvae"), "--epochs", "0"]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "c.cvae").exists()
