"""`cvae eval --cas`: the classification accuracy score
(cvae.workflows.classification_accuracy_scores).

Tiny IDX data (make_digits: a class-specific bar per digit), a run of digits 0-3 trained long
enough to draw its digits (with a tiny flow prior), and an untrained one that draws noise.
The classifiers train with a small recipe (a judge file's header) where the default one is
not what a test is about, so the module runs in seconds.
"""

import json
import re
import shutil

import numpy as np
import pytest

from cvae import cli, report, sweep
from cvae import classifier as C
from cvae import workflows as W
from cvae.checkpoint import save_checkpoint
from cvae.data import Dataset
from cvae.errors import CvaeError
from cvae.evaluate import accuracy_by_digit
from cvae.model import Arch, Model
from cvae.sheets import set_labels
from cvae.train_classifier import recipe_of, train_with_recipe
from .conftest import assert_one_line_error, make_digits, run_cli, write_mnist_dir, write_split

pytestmark = pytest.mark.usefixtures("no_real_data")

DIGITS = [0, 1, 2, 3]
CVAE_ARGS = ["--hidden", "64,32", "--latent", "4", "--batch", "16", "--threads", "1",
             "--no-images", "--quiet", "--digits", "0-3", "--prior", "gaussian"]
PRIOR_ARGS = ["--hidden", "16", "--blocks", "1", "--epochs", "2", "--batch", "32",
              "--threads", "1", "--quiet"]
EVAL_ARGS = ["--k", "2", "--samples", "10", "--threads", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data (1,000 training digits, 200 test digits), a decent run of digits 0-3 with
    a flow prior ("good"), and an untrained model of the same digits ("garbage")."""
    root = tmp_path_factory.mktemp("cas")
    data = write_mnist_dir(root / "mnist", n_train=1000, n_test=200)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CVAE_DATA", raising=False)
        mp.setenv("CVAE_CACHE", str(root / "cache"))
        assert cli.main(["train", *CVAE_ARGS, "--epochs", "20", "--data", str(data),
                         "--out", str(root / "good")]) == 0
        assert cli.main(["prior", "train", "--checkpoint", str(root / "good"),
                         *PRIOR_ARGS]) == 0
    model = Model(Arch(h1=64, h2=32, latent=4), max_batch=64, threads=1)
    model.init_params(0)
    (root / "garbage").mkdir()
    save_checkpoint(root / "garbage" / "last.cvae", "cvae",
                    {"arch": model.arch.to_json(), "digits": DIGITS, "adam_t": 0},
                    model.state_sections())
    train = Dataset.load(data, "train", DIGITS)
    return {"root": root, "data": data, "good": root / "good", "garbage": root / "garbage",
            "n_train": len(train)}


@pytest.fixture
def run(world, tmp_path):
    """A copy of the good run (eval writes eval.json into it)."""
    return shutil.copytree(world["good"], tmp_path / "good")


def small_judge(world, path, **meta):
    """A judge with a small recipe recorded in its header, trained on the data's training
    images of DIGITS (so it is what the CAS's real reference trains), measured on the test
    set: (path, classifier)."""
    train = Dataset.load(world["data"], "train", DIGITS)
    test = Dataset.load(world["data"], "test")
    recipe = {**recipe_of(), "epochs": 3, "batch": 32, "arch": {"h1": 64, "h2": 32,
                                                                "act": "relu"}}
    model = train_with_recipe(train, recipe)
    header = {key: recipe[key] for key in ("epochs", "batch", "lr", "seed", "max_shift",
                                           "precision")}
    C.save_classifier(path, model, {**header, "train_images": len(train),
                                    "test_digest": C.dataset_digest(test), **meta})
    return path, model


def test_eval_cas_writes_its_figures_for_each_prior(world, run, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", world["data"],
                             *EVAL_ARGS, "--cas", "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert set(r["by_prior"]) == {"flow", "gaussian"}
    for name, figures in r["by_prior"].items():
        assert set(figures["cas_per_digit"]) == {"0", "1", "2", "3"}, name
        assert figures["cas"] == pytest.approx(np.mean(list(figures["cas_per_digit"].values())),
                                               abs=0.1)  # test digits are about balanced
        assert figures["cas"] >= 0.9, (name, figures["cas_per_digit"])  # a decent model
        # The judge's conditional accuracy is unaffected (no classifier for this data: None).
        assert figures["cond_accuracy"] is None
    assert r["cas"] == r["by_prior"]["flow"]["cas"]  # the first prior's at the top level
    assert r["cas_images"] == world["n_train"]  # the real training set's size, digits 0-3
    assert r["cas_real_source"] == "trained" and set(r["cas_real_per_digit"]) == {"0", "1", "2",
                                                                                  "3"}
    assert r["cas_real"] >= 0.9
    assert r["cas_recipe"] == recipe_of()  # no judge: cvae classifier train's defaults
    written = json.loads((run / "eval.json").read_text())
    assert written["by_prior"]["gaussian"]["cas"] == r["by_prior"]["gaussian"]["cas"]
    assert written["cas_real"] == r["cas_real"]


def test_eval_cas_table(world, run, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", world["data"],
                             *EVAL_ARGS, "--cas")
    assert code == 0, err
    text = " ".join(out.split())
    assert "CAS (flow, T = 1)" in text and "CAS (gaussian, T = 1)" in text
    assert "CAS digit 3" in text and "CAS of real digits" in text


def test_without_cas_nothing_of_it(world, run, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", world["data"],
                             *EVAL_ARGS, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert not [k for k in r if k.startswith("cas")]
    assert not [k for f in r["by_prior"].values() for k in f if k.startswith("cas")]
    assert "CAS" not in err


def test_a_garbage_generator_scores_low(world, tmp_path):
    run = shutil.copytree(world["garbage"], tmp_path / "garbage")
    r = W.run_eval(run, data=world["data"], k=2, samples=10, threads=1, cas=True)
    assert set(r["by_prior"]) == {"gaussian"}
    # Four digits: chance is 25%; the untrained decoder's digits teach nothing about real ones.
    assert r["cas"] <= 0.5, r["cas_per_digit"]
    assert r["cas_real"] >= 0.9


def test_same_seed_same_scores_and_the_set_size_is_a_parameter(world, run):
    kwargs = dict(data=world["data"], k=2, samples=10, threads=1, cas=True, prior="gaussian",
                  cas_size=260)
    a = W.run_eval(run, seed=3, **kwargs)
    b = W.run_eval(run, seed=3, **kwargs)
    assert a["cas_images"] == 260
    assert a["cas_per_digit"] == b["cas_per_digit"] and a["cas"] == b["cas"]
    assert a["cas_real_per_digit"] == b["cas_real_per_digit"]


def test_cas_counts_follow_the_real_digit_counts():
    train = Dataset(np.zeros((10, 784), np.uint8), np.array([0] * 6 + [1] * 3 + [2], np.uint8))
    assert W.cas_counts(train, (0, 1, 2)) == [6, 3, 1]
    assert W.cas_counts(train, (0, 1, 2), size=20) == [12, 6, 2]
    assert W.cas_counts(train, (0, 1, 2), size=7) == [4, 2, 1]  # 4.2, 2.1, 0.7
    assert sum(W.cas_counts(train, (0, 1), size=5)) == 5
    # Rows of a set with these counts are labelled in digit order; equal counts are row // n.
    assert set_labels((0, 1, 2), [6, 3, 1], 0, 10).tolist() == [0] * 6 + [1] * 3 + [2]
    assert (set_labels((3, 5), [4, 4], 2, 8) == np.array([3, 3, 5, 5, 5, 5])).all()


def test_the_judge_is_the_real_reference_when_it_was_trained_so(world, run, tmp_path, capsys):
    path, judge = small_judge(world, tmp_path / "judge.cvae")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", world["data"],
                             *EVAL_ARGS, "--cas", "--json", "--classifier", path)
    assert code == 0, err
    r = json.loads(out)
    assert r["cas_real_source"] == "judge"
    test = Dataset.load(world["data"], "test")
    assert r["cas_real"] == accuracy_by_digit(judge, test, DIGITS)[0]
    # ... and what the CAS classifiers train with is its recipe.
    assert r["cas_recipe"]["epochs"] == 3 and r["cas_recipe"]["arch"]["h1"] == 64
    # Reusing it is exact: the recipe trained again on the real digits gives the same figure.
    again = train_with_recipe(Dataset.load(world["data"], "train", DIGITS), r["cas_recipe"])
    assert accuracy_by_digit(again, test, DIGITS)[0] == r["cas_real"]


def test_a_judge_of_other_training_images_is_not_the_reference(world, run, tmp_path, capsys):
    path, _ = small_judge(world, tmp_path / "judge.cvae", train_images=60000)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", world["data"],
                             *EVAL_ARGS, "--cas", "--json", "--classifier", path,
                             "--prior", "gaussian")
    assert code == 0, err
    assert json.loads(out)["cas_real_source"] == "trained"


def test_bad_combinations_are_one_line_errors(world, run, tmp_path, capsys):
    # No training split: the set's size and the reference come from it.
    test_only = tmp_path / "test-only"
    test_only.mkdir()
    shutil.copy(world["data"] / "t10k-images-idx3-ubyte", test_only)
    shutil.copy(world["data"] / "t10k-labels-idx1-ubyte", test_only)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", test_only,
                             *EVAL_ARGS, "--cas")
    assert_one_line_error(code, err, "train")
    assert not (run / "eval.json").exists()
    # A training split without the run's digits.
    images = np.zeros((300, 784), np.uint8)
    (tmp_path / "other").mkdir()
    other = write_split(tmp_path / "other", "train", images, np.full(300, 7, np.uint8))
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(world["data"] / name, other)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", other,
                             *EVAL_ARGS, "--cas")
    assert_one_line_error(code, err, "digit")
    # Fewer training digits than one batch of the recipe (128).
    (tmp_path / "few").mkdir()
    few = write_split(tmp_path / "few", "train", *make_digits(100, 0))
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(world["data"] / name, few)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", few,
                             *EVAL_ARGS, "--cas")
    assert_one_line_error(code, err, "fewer than one batch (128)")
    # A judge whose header's recipe cvae cannot train.
    bad, _ = small_judge(world, tmp_path / "bad.cvae", epochs=-1)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", world["data"],
                             *EVAL_ARGS, "--cas", "--classifier", bad)
    assert_one_line_error(code, err, "recipe", str(bad))
    assert not (run / "eval.json").exists()
    # The set size of the library call.
    with pytest.raises(CvaeError, match="positive"):
        W.run_eval(run, data=world["data"], k=2, samples=10, threads=1, cas=True, cas_size=0)


def test_sweep_table_and_report_show_cas_only_when_present(world, run, tmp_path):
    plain = shutil.copytree(world["good"], tmp_path / "plain")
    W.run_eval(plain, data=world["data"], k=2, samples=10, threads=1)
    W.run_eval(run, data=world["data"], k=2, samples=10, threads=1, cas=True)
    rows = sweep.read_rows(tmp_path, plain)
    assert "cas" not in rows[0]
    assert "CAS" not in sweep.render_markdown(rows, "t")
    rows = sweep.read_rows(tmp_path, run)
    assert {r["prior"]: r["cas"] is not None for r in rows} == {"flow": True, "gaussian": True}
    table = sweep.render_markdown(rows, "t")
    assert "| CAS | CAS real |" in table and "**CAS**" in table
    assert "CAS " in sweep.summary(rows)
    for prior, sheet in (("gaussian", "samples.pgm"), ("flow", "samples-flow.pgm")):
        assert cli.main(["generate", "--checkpoint", str(run), "--prior", prior, "--out",
                         str(run / sheet), "--per-digit", "10", "--threads", "1"]) == 0
    page, _ = report.build_report(run, data=world["data"], threads=1)
    assert "CAS of real digits" in page and "CAS per digit" in page
    # each sheet's caption: its prior's CAS beside the real digits'
    assert len(re.findall(r"CAS <b>\d+\.\d%</b> \(real digits: \d+\.\d%\)", page)) == 2
    page, _ = report.build_report(plain, data=world["data"], threads=1)
    # (not "CAS" itself: the page's base64 pictures may hold those letters)
    assert 'title="cas' not in page and ">CAS" not in page
