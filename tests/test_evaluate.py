"""cvae eval: the negative ELBO, the IWAE bound and SSIM per digit (cvae/evaluate.py).

Tiny models and tiny IDX files, so the module runs in seconds; real MNIST digits only where
CVAE_DATA is set."""

import json
import math
import os
import tracemalloc

import numpy as np
import pytest

from cvae import evaluate as E
from cvae.data import Dataset
from cvae.images import to_uint8
from cvae.model import Arch, Model
from cvae import train_classifier as TC
from .conftest import REAL, checkpoint_world, image_idx, label_idx, needs_real_data, run_cli


# ---------------------------------------------------------------- synthetic digits


def synthetic_digits(labels, rng, jitter=1.5):
    """Digit-like uint8 images: per class a fixed polyline of 4 strokes (from a fixed seed),
    its control points jittered per image, drawn as soft 1.5-pixel-wide lines."""
    labels = np.asarray(labels, dtype=np.uint8)
    templates = np.random.default_rng(1234).uniform(5, 23, size=(10, 5, 2))
    points = templates[labels] + rng.normal(0, jitter, size=(len(labels), 5, 2))
    a, b = points[:, :-1], points[:, 1:]                      # (n, 4, 2) stroke ends
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    p = np.stack([yy, xx], axis=-1)[None, None]               # (1, 1, 28, 28, 2)
    d = (b - a)[:, :, None, None, :]
    t = np.clip(((p - a[:, :, None, None, :]) * d).sum(-1) / (d * d).sum(-1).clip(1e-9), 0, 1)
    dist2 = ((a[:, :, None, None, :] + t[..., None] * d - p) ** 2).sum(-1)
    ink = np.exp(-dist2 / (2 * 1.5 ** 2)).max(axis=1)         # (n, 28, 28)
    return np.round(255 * ink.clip(0, 1)).astype(np.uint8).reshape(-1, 784), labels


# ---------------------------------------------------------------- SSIM


def skimage_ssim(a, b, full=False):
    from skimage.metrics import structural_similarity

    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1, full=full)


def degraded(images, rng):
    """Originals (bytes/255) and a blurred, shifted, noisy copy of them in [0, 1]."""
    x = images.reshape(-1, 28, 28).astype(np.float64) / 255.0
    y = 0.5 * x + 0.25 * np.roll(x, 1, axis=2) + 0.25 * np.roll(x, 1, axis=1)
    y = (y + rng.normal(0, 0.05, size=y.shape)).clip(0, 1)
    return x, y


def check_against_skimage(images):
    x, y = degraded(images, np.random.default_rng(3))
    ours = E.ssim(x, y)
    theirs = np.array([skimage_ssim(a, b) for a, b in zip(x, y)])
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # skimage filters the whole image, then crops (win_size - 1) // 2 = 5 pixels per side
    # before averaging: exactly our 18x18 valid window positions.
    _, full_map = skimage_ssim(x[0], y[0], full=True)
    ours_map = E.ssim_map(x[:1], y[:1])[0]
    assert ours_map.shape == (18, 18)
    np.testing.assert_allclose(ours_map, full_map[5:-5, 5:-5], atol=1e-10)
    return ours


def test_ssim_equals_scikit_image_on_synthetic_digits():
    images, _ = synthetic_digits(np.arange(40) % 10, np.random.default_rng(0))
    values = check_against_skimage(images)
    assert 0.1 < values.mean() < 0.99
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(E.ssim(x, x), 1.0, atol=1e-12)


@needs_real_data
def test_ssim_equals_scikit_image_on_real_digits():
    test = Dataset.load(REAL, "test")
    check_against_skimage(np.asarray(test.images[:100]))


def test_gaussian_window_is_scipys():
    from scipy.ndimage import gaussian_filter1d

    impulse = np.zeros(31)
    impulse[15] = 1.0
    taps = gaussian_filter1d(impulse, 1.5, truncate=3.5)[10:21]  # skimage's window
    np.testing.assert_allclose(E.gaussian_window(), taps, atol=1e-15)


def test_per_digit_means():
    values = np.array([1.0, 2.0, 3.0, 5.0])
    assert E.per_digit_means(values, [0, 3, 0, 3], (0, 3)) == {0: 2.0, 3: 3.5}


# ---------------------------------------------------------------- a briefly trained model


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained 400 steps (real MNIST when CVAE_DATA is set) and 256 test digits."""
    rng = np.random.default_rng(0)
    if REAL:
        train = Dataset.load(REAL, "train")
        train_x, train_y = np.asarray(train.images[:20000]), np.asarray(train.labels[:20000])
        test = Dataset.load(REAL, "test")
        test_set = Dataset(np.ascontiguousarray(test.images[:256]),
                           np.ascontiguousarray(test.labels[:256]), "real")
    else:
        train_x, train_y = synthetic_digits(rng.integers(0, 10, 4000), rng)
        test_set = Dataset(*synthetic_digits(np.arange(256) % 10, rng), name="synthetic")
    model = Model(Arch(h1=64, h2=32, latent=8), max_batch=64, threads=1)
    model.init_params(0)
    for step in range(400):
        rows = rng.integers(0, len(train_y), 64)
        model.train_step(np.ascontiguousarray(train_x[rows]), np.ascontiguousarray(train_y[rows]),
                         lr=2e-3, beta=1.0, seed=1, step=step)
    return model, test_set


def test_k1_log_weights_average_to_the_elbo(trained):
    model, data = trained
    x, y = data.images, data.labels
    rec, kl = (v.astype(np.float64) for v in model.evaluate(x[:64], y[:64], 0, E.EVAL_STEP))
    # Same noise key as the ELBO: the reconstruction term is the same number; the sampled
    # log q - log p has the analytic KL as its mean.
    lw = E.log_weights(model, x[:64], y[:64], 0, E.EVAL_STEP)
    sampled_kl = -lw - rec
    diff = sampled_kl - kl
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)) + 1e-3
    # Over the whole set with the IWAE's own keys: the k = 1 bound is the ELBO, up to noise.
    neg_elbo, _, _ = E.test_elbo(model, data, 0)
    per_image = []
    for start in range(0, len(y), 64):
        per_image.append(-E.log_weights(model, x[start:start + 64], y[start:start + 64], 0,
                                        E.IWAE_STEP, first_index=start))
    per_image = np.concatenate(per_image)
    assert E.iwae_nll(model, data, 0, 1) == pytest.approx(per_image.mean(), abs=1e-9)
    noise = per_image.std() / math.sqrt(len(per_image))
    assert abs(per_image.mean() - neg_elbo) < 4 * noise + 0.05


def test_iwae_64_is_not_above_the_elbo(trained):
    model, data = trained
    neg_elbo, rec, kl = E.test_elbo(model, data, 0)
    nll1 = E.iwae_nll(model, data, 0, 1)
    nll64 = E.iwae_nll(model, data, 0, 64)
    print(f"\ntiny model: -ELBO {neg_elbo:.2f} (rec {rec:.2f}, KL {kl:.2f}), "
          f"IWAE k=1 {nll1:.2f}, k=64 {nll64:.2f}")
    assert nll64 <= neg_elbo + 0.1
    assert nll64 < nll1
    assert kl > 0.5  # the model uses its latent code, so the bound has room to tighten


def test_streaming_lse_equals_direct_lse(trained):
    model, data = trained
    x, y = data.images[:20], data.labels[:20]
    k = 7
    weights = np.stack([E.log_weights(model, x, y, 5, E.IWAE_STEP + j, first_index=0)
                        for j in range(k)])                               # (k, n), all at once
    top = weights.max(axis=0)
    direct = top + np.log(np.exp(weights - top).sum(axis=0)) - math.log(k)
    streamed = E.iwae_log_likelihood(model, x, y, 5, k)
    np.testing.assert_allclose(streamed, direct, rtol=0, atol=1e-9)


def test_streaming_lse_is_stable_at_extremes():
    terms = [[1000.0, -1000.0, -np.inf], [-1000.0, -1000.0, -np.inf], [3.0, -np.inf, -np.inf]]
    lse = E.StreamingLogSumExp(3)
    for term in terms:  # one term for each of the 3 rows at a time
        lse.add(term)
    out = lse.result()
    assert out[0] == pytest.approx(1000.0)
    assert out[1] == pytest.approx(-1000.0 + math.log(2))
    assert out[2] == -np.inf
    assert lse.count == 3


def test_results_are_deterministic_for_a_seed_and_independent_of_the_batch(trained):
    model, data = trained
    first = E.evaluate_model(model, data, tuple(range(10)), seed=3, k=4)
    assert E.evaluate_model(model, data, tuple(range(10)), seed=3, k=4) == first
    other = E.evaluate_model(model, data, tuple(range(10)), seed=4, k=4)
    assert other["iwae_nll"] != first["iwae_nll"] and other["neg_elbo"] != first["neg_elbo"]
    assert other["ssim"] == first["ssim"]  # z = mu: no noise
    # Noise is keyed by image index, so a model with another batch size agrees.
    small = Model(model.arch, max_batch=16, threads=2)
    small.group_block("param")[...] = model.group_block("param")
    again = E.evaluate_model(small, data, tuple(range(10)), seed=3, k=4)
    for key in ("neg_elbo", "rec", "kl", "iwae_nll", "ssim"):
        assert again[key] == pytest.approx(first[key], rel=1e-5)


def test_k_5000_on_a_tiny_batch_in_bounded_memory(trained):
    model, data = trained
    x, y = data.images[:3], data.labels[:3]
    tracemalloc.start()
    try:
        ll = E.iwae_log_likelihood(model, x, y, 0, 5000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isfinite(ll).all()
    assert peak < 200_000  # bytes: nothing grows with k
    assert (ll >= E.iwae_log_likelihood(model, x, y, 0, 10) - 1.0).all()


def test_k_must_be_positive(trained):
    model, data = trained
    with pytest.raises(E.CvaeError, match="--k"):
        E.iwae_nll(model, data, 0, 0)


# ---------------------------------------------------------------- the command

TRAINED_DIGITS = [0, 1, 2]
N_TEST = 30  # labels i % 10: digits 3-9 are in the file but not trained


@pytest.fixture
def world(tmp_path):
    model = Model(Arch(h1=32, h2=16, latent=8), max_batch=64, threads=1)
    model.init_params(0)
    images, labels = synthetic_digits(np.arange(N_TEST) % 10, np.random.default_rng(2))
    return checkpoint_world(tmp_path, model, TRAINED_DIGITS, images, labels)


KEYS = {"neg_elbo", "rec", "kl", "iwae_nll", "k", "ssim", "ssim_per_digit", "seed",
        "checkpoint", "n_images", "seconds"}


def test_eval_json_prints_one_object_and_writes_eval_json(world, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                             "--k", 5, "--seed", 2, "--threads", 1, "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert KEYS <= set(result)
    assert result["k"] == 5 and result["seed"] == 2
    assert result["n_images"] == 9  # digits 0, 1, 2 of 30 images labelled i % 10
    assert set(result["ssim_per_digit"]) == {"0", "1", "2"}
    assert result["checkpoint"] == os.path.abspath(world["ckpt"])
    assert result["eval_json"] == os.path.abspath(world["run"] / "eval.json")
    written = json.loads((world["run"] / "eval.json").read_text())
    # The file names the checkpoint beside it, with no machine path; the rest as printed.
    assert written["checkpoint"] == "last.cvae"
    assert written == {**{k: v for k, v in result.items() if k != "eval_json"},
                       "checkpoint": "last.cvae"}
    # The same figures as the library on the trained digits' rows, in file order.
    rows = np.flatnonzero(np.isin(world["labels"], TRAINED_DIGITS))
    data = Dataset(world["images"][rows], world["labels"][rows])
    expected = E.evaluate_model(world["model"], data, tuple(TRAINED_DIGITS), seed=2, k=5)
    for key in ("neg_elbo", "rec", "kl", "iwae_nll", "ssim"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6)
    assert not [f for f in os.listdir(world["run"]) if f.endswith(".tmp")]


def test_eval_table(world, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", world["ckpt"], "--data", world["data"],
                             "--k", 3, "--threads", 1)
    assert code == 0, err
    assert "negative ELBO" in out and "IWAE NLL (k = 3)" in out and "SSIM digit 2" in out
    assert (world["run"] / "eval.json").exists()


def one_line_error(capsys, *argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cvae: error:")
    assert fragment in err
    return err


@pytest.mark.parametrize("k", [0, -3])
def test_k_not_positive_is_one_line_exit_2(world, capsys, k):
    one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                   "--k", k, fragment="--k: must be a positive integer")
    assert not (world["run"] / "eval.json").exists()


def test_missing_and_damaged_checkpoints(world, capsys, tmp_path):
    one_line_error(capsys, "eval", "--checkpoint", tmp_path / "nope.cvae", "--data", world["data"],
                   fragment="does not exist")
    damaged = world["run"] / "damaged.cvae"
    blob = bytearray(world["ckpt"].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    one_line_error(capsys, "eval", "--checkpoint", damaged, "--data", world["data"],
                   fragment=str(damaged))
    truncated = world["run"] / "short.cvae"
    truncated.write_bytes(world["ckpt"].read_bytes()[:100])
    one_line_error(capsys, "eval", "--checkpoint", truncated, "--data", world["data"],
                   fragment=str(truncated))
    assert not (world["run"] / "eval.json").exists()


def test_data_without_the_checkpoints_digits(world, capsys, tmp_path):
    data = tmp_path / "other"
    data.mkdir()
    images, labels = synthetic_digits(np.array([0, 1, 0, 1]), np.random.default_rng(0))
    (data / "t10k-images-idx3-ubyte").write_bytes(image_idx(images))
    (data / "t10k-labels-idx1-ubyte").write_bytes(label_idx(labels))
    one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", data,
                   fragment="no images of digit 2")
    assert not (world["run"] / "eval.json").exists()


def test_unwritable_eval_json_location(world, capsys):
    (world["run"] / "eval.json").mkdir()
    one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                   "--k", 2, fragment="eval.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_run_directory(world, capsys):
    os.chmod(world["run"], 0o555)
    try:
        one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                       "--k", 2, fragment="not writable")
    finally:
        os.chmod(world["run"], 0o755)
    assert not (world["run"] / "eval.json").exists()


# ---------------------------------------------------------------- conditional accuracy and FID


def test_frechet_distance_matches_scipy():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(0.3, 1.0, size=(300, 12)) @ rng.normal(size=(12, 12))
    mean_a, cov_a = a.mean(0), np.cov(a, rowvar=False)
    mean_b, cov_b = b.mean(0), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = (np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(root))
    assert E.frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-8)
    assert abs(E.frechet_distance(mean_a, cov_a, mean_a, cov_a)) < 1e-9
    # A rank-deficient covariance (fewer samples than features) stays finite and exact.
    c = rng.normal(size=(5, 12))
    mean_c, cov_c = c.mean(0), np.cov(c, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_c)
    expected = (np.sum((mean_a - mean_c) ** 2) + np.trace(cov_a) + np.trace(cov_c)
                - 2 * np.trace(root).real)
    assert E.frechet_distance(mean_a, cov_a, mean_c, cov_c) == pytest.approx(expected, rel=1e-6)


def test_feature_moments_stream_to_numpys_mean_and_covariance():
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(1000, 7)).astype(np.float32)
    moments = E.FeatureMoments(7)
    for start in range(0, 1000, 300):
        moments.add(x[start:start + 300])
    mean, cov = moments.mean_cov()
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-8)


class AlwaysOne:
    """A stand-in judge that calls every image a 1; its features are the images' first
    pixels, so the FID is computed on real (if crude) features."""

    class arch:
        h2 = 6

    def predict(self, images):
        logits = np.zeros((len(images), 10), dtype=np.float32)
        logits[:, 1] = 1
        return logits, np.asarray(images[:, 300:306], dtype=np.float32)


def test_conditional_accuracy_counts_per_digit(world):
    test = Dataset(world["images"], world["labels"])
    result = E.judge_samples(world["model"], AlwaysOne(), (0, 1, 2), 50, 1.0, 0, test)
    assert result["cond_accuracy_per_digit"] == {0: 0.0, 1: 1.0, 2: 0.0}
    assert result["cond_accuracy"] == pytest.approx(1 / 3)
    fid, floor = result["fid"], result["fid_test_floor"]
    assert np.isfinite(fid) and fid >= 0 and np.isfinite(floor) and floor >= 0
    assert set(result["diversity_per_digit"]) == {0, 1, 2} and result["diversity"] > 0
    assert E.judge_samples(world["model"], AlwaysOne(), (0, 1, 2), 50, 1.0, 0, test) == result


def test_diversity_is_the_mean_distance_over_pairs_of_a_digits_samples():
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(4)
    f = rng.normal(0, 3, (2500, 5)).astype(np.float32)   # more than one block of 1024 rows
    assert E.mean_pairwise_distance(f) == pytest.approx(pdist(f.astype(np.float64)).mean(),
                                                        rel=1e-9)
    labels = np.arange(2500) % 3
    per_digit = E.diversity_by_digit(f, labels, (0, 2))
    assert per_digit == {d: pytest.approx(pdist(f[labels == d].astype(np.float64)).mean(),
                                          rel=1e-9) for d in (0, 2)}
    assert np.isnan(E.mean_pairwise_distance(f[:1]))
    same = np.repeat(f[:1], 10, axis=0)   # a collapsed generator
    assert E.mean_pairwise_distance(same) == pytest.approx(0, abs=1e-6)


def test_fid_and_its_floor_compare_equal_sized_sets_with_the_same_digits():
    """Half B's labels drive the generated set and half B is the floor's set: a generator
    that returns half B's own images scores exactly the floor."""
    images, labels = synthetic_digits(np.arange(40) % 10, np.random.default_rng(3))
    test = Dataset(images, labels)
    half_a, half_b = E.test_halves(40, seed=5)
    assert len(half_a) == len(half_b) == 20 and not set(half_a) & set(half_b)
    assert np.array_equal(E.test_halves(40, seed=5)[1], half_b)

    class Replay:
        """A 'model' whose decoder returns half B's images in order (labels checked)."""
        class arch:
            latent = 3
        max_batch = 64

        def __init__(self):
            self.calls = []

        def decode(self, z, chunk_labels):
            self.calls.append(np.array(chunk_labels))
            n = sum(len(c) for c in self.calls)
            if n <= 30:  # the accuracy pass: 3 digits x 10 samples
                return np.zeros((len(z), 784), dtype=np.float32)
            rows = half_b[n - 30 - len(z):n - 30]
            assert np.array_equal(chunk_labels, labels[rows])
            return images[rows].astype(np.float32) / 255.0

        def decode_bytes(self, z, chunk_labels, out):  # as Model's: decode's pixels as bytes
            out[...] = to_uint8(self.decode(z, chunk_labels))
            return out

    judge = AlwaysOne()
    judge.arch.h2 = 6
    result = E.judge_samples(Replay(), judge, (0, 1, 2), 10, 1.0, 5, test)
    assert result["fid"] == pytest.approx(result["fid_test_floor"], abs=1e-9)


def trained_judge(world, tmp_path):
    """A tiny classifier trained on the world's test images, saved as a file."""
    from cvae import classifier as C

    images, labels = synthetic_digits(np.arange(300) % 10, np.random.default_rng(5))
    model = TC.train_classifier(Dataset(images, labels, "synthetic"), epochs=2, batch=32,
                               seed=0, arch=C.ClassifierArch(h1=32, h2=16))
    path = tmp_path / "judge.cvae"
    C.save_classifier(path, model, {"test_accuracy": 0.5})
    return path


def test_eval_without_a_classifier_for_the_data_says_so(world, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", world["run"], "--data",
                             world["data"], "--k", 2, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["cond_accuracy"] is None and result["fid"] is None
    assert result["classifier"] is None and "cvae classifier train" in result["classifier_note"]
    code, out, err = run_cli(capsys, "eval", "--checkpoint", world["run"], "--data",
                             world["data"], "--k", 2)
    assert code == 0 and "need a classifier" in " ".join(out.split())


def test_eval_with_a_classifier_at_two_temperatures(world, capsys, tmp_path):
    judge = trained_judge(world, tmp_path)
    results = {}
    for t in ("1", "0.7"):
        code, out, err = run_cli(capsys, "eval", "--checkpoint", world["run"], "--data",
                                 world["data"], "--k", 2, "--samples", 40, "--temperature", t,
                                 "--classifier", judge, "--json")
        assert code == 0, err
        results[t] = json.loads(out)
    for t, r in results.items():
        assert r["temperature"] == float(t) and r["samples"] == 40
        assert 0 <= r["cond_accuracy"] <= 1 and set(r["cond_accuracy_per_digit"]) == {"0", "1", "2"}
        assert r["cond_accuracy"] == pytest.approx(np.mean(list(r["cond_accuracy_per_digit"].values())))
        assert r["fid"] >= 0 and r["fid_test_floor"] >= 0
        assert r["classifier"] == str(judge) and r["classifier_test_accuracy"] == 0.5
    assert results["1"]["fid"] != results["0.7"]["fid"]
    assert results["1"]["fid_test_floor"] == results["0.7"]["fid_test_floor"]
    code, out, err = run_cli(capsys, "eval", "--checkpoint", world["run"], "--data",
                             world["data"], "--k", 2, "--samples", 40, "--classifier", judge)
    assert code == 0 and "conditional accuracy (T = 1)" in out and "FID test-halves floor" in out


@pytest.mark.parametrize("option,value,fragment", [
    ("--samples", 0, "--samples: must be a positive integer"),
    ("--samples", -5, "--samples: must be a positive integer"),
    ("--temperature", -1, "--temperature: must be a non-negative number"),
    ("--temperature", "nan", "--temperature: must be a non-negative number"),
])
def test_samples_and_temperature_out_of_range(world, capsys, option, value, fragment):
    one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                   option, value, fragment=fragment)
    assert not (world["run"] / "eval.json").exists()


def test_damaged_or_foreign_classifier(world, capsys, tmp_path):
    judge = trained_judge(world, tmp_path)
    damaged = tmp_path / "damaged.cvae"
    blob = bytearray(judge.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                   "--classifier", damaged, fragment=str(damaged))
    # A CVAE checkpoint is not a classifier.
    one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                   "--classifier", world["ckpt"], fragment="classifier")
    one_line_error(capsys, "eval", "--checkpoint", world["run"], "--data", world["data"],
                   "--classifier", tmp_path / "absent.cvae", fragment="does not exist")
    assert not (world["run"] / "eval.json").exists()
