"""End to end through the real CLI on real MNIST: train briefly, then every output is valid.

The data comes the way `cvae train` gets it: $CVAE_DATA when set (CI points it at the real
files), else the per-user cache, fetched and verified on first use.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cvae as cvae_package
from cvae.checkpoint import load_checkpoint
from cvae.images import read_pgm


def cvae(*args, cwd):
    # the package under test, whether installed or imported from the source tree
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cvae_package.__file__)))
    result = subprocess.run([sys.executable, "-m", "cvae", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return result


def check_sheet(pgm_path):
    """The PGM decodes, and every sidecar cell lies inside it at its stated pitch."""
    image = read_pgm(pgm_path)
    sidecar = json.loads(pgm_path.with_suffix(".json").read_text())
    assert image.shape == (sidecar["height"], sidecar["width"])
    assert sidecar["cells"], pgm_path
    for cell in sidecar["cells"]:
        assert 0 <= cell["x"] <= sidecar["width"] - 28 and 0 <= cell["y"] <= sidecar["height"] - 28
        assert cell["label"] is None or 0 <= cell["label"] <= 9
    drawn = [c for c in sidecar["cells"] if c["label"] is not None]
    assert any(image[c["y"]:c["y"] + 28, c["x"]:c["x"] + 28].max() > 128 for c in drawn)
    return sidecar


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("integration")
    result = cvae("train", "--variant", "mini", "--epochs", 2, "--threads", 2, "--out", "run",
                  "--json", cwd=work)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    # One object per epoch, then the flow prior's (trained by default after the CVAE): one per
    # epoch and the summary.
    assert "prior" in lines[-1] and lines[-1]["cvae_seconds"] > 0, lines[-1]
    prior_epochs = [line["prior_epoch"] for line in lines if "prior_epoch" in line]
    assert prior_epochs == list(range(1, lines[-1]["epochs"] + 1))
    return work / "run", [line for line in lines if "epoch" in line]


def test_training_lowers_the_loss_and_the_test_elbo_is_plausible(trained_run):
    run, epochs = trained_run
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert np.isfinite(e["test_neg_elbo"]) and 30 < e["test_neg_elbo"] < 300
        assert abs(e["test_neg_elbo"] - (e["test_rec"] + e["test_kl"])) < 1e-6 * e["test_neg_elbo"]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[1]["test_neg_elbo"] < epochs[0]["test_neg_elbo"]
    assert epochs[1]["beta"] == 1.0  # a progressive run ends at beta = 1
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_every_output_file_is_valid(trained_run):
    run, _ = trained_run
    for name in ("epoch-0001.cvae", "epoch-0002.cvae", "last.cvae"):
        meta, sections, _ = load_checkpoint(run / name, expected_kind="cvae")
        assert all(np.isfinite(a).all() for a in sections.values())
    assert meta["epoch"] == 2 and meta["digits"] == [0, 1]
    json.loads((run / "config.json").read_text())
    meta, _, _ = load_checkpoint(run / "prior.cvae", expected_kind="prior")
    assert meta["complete"]
    for sheet in ("samples", "samples-flow", "reconstructions", "interpolations",
                  "interpolations-classes"):
        check_sheet(run / f"{sheet}.pgm")


def test_sheets_from_the_checkpoint(trained_run):
    run, _ = trained_run
    cvae("generate", "--checkpoint", run, "--per-digit", 7, "--out", run / "gen.pgm", cwd=run)
    labels = [c["label"] for c in check_sheet(run / "gen.pgm")["cells"] if c["label"] is not None]
    assert sorted(labels) == [0] * 7 + [1] * 7
    cvae("reconstruct", "--checkpoint", run / "last.cvae", "--n", 12, "--out", run / "rec.pgm",
         cwd=run)
    check_sheet(run / "rec.pgm")
    cvae("interpolate", "--checkpoint", run, "--out", run / "walk.pgm", cwd=run)
    check_sheet(run / "walk.pgm")


def test_eval_judges_samples_with_the_shipped_classifier(trained_run):
    """On the real MNIST test set the shipped classifier applies; a 2-epoch mini model's
    samples of 0 and 1 are recognised well above the one in ten of chance (its 396 steps give
    about 0.5), and its FID sits above the test-halves floor."""
    run, _ = trained_run
    result = cvae("eval", "--checkpoint", run, "--k", 5, "--samples", 300, "--json", cwd=run)
    r = json.loads(result.stdout)
    assert r["classifier"] and r["classifier"].endswith("mnist-classifier.cvae")
    assert r["classifier_test_accuracy"] >= 0.985
    assert set(r["cond_accuracy_per_digit"]) == {"0", "1"}
    assert r["cond_accuracy"] > 0.3, r["cond_accuracy_per_digit"]
    assert r["fid"] > r["fid_test_floor"] > 0
    assert r["iwae_nll"] < r["neg_elbo"] + 1.0
