"""`cvae train --prior flow`: the flow prior trained after the CVAE (RUN/prior.cvae), its
digit sheet samples-flow.pgm, its time beside the CVAE's, Ctrl-C during the prior, and
`cvae train --resume` finishing (or adding) the prior. Tiny synthetic data: the prior trains
with its default settings on 200 codes, one step per epoch."""

import json
import os
import signal

import numpy as np
import pytest

from cvae import cli
from cvae import prior as P
from cvae.checkpoint import load_checkpoint
from cvae.images import read_pgm
from cvae.model import model_from_checkpoint
from cvae import rundir as R
from cvae import workflows as W
from cvae import sheets
from .conftest import run_cli, write_mnist_dir

pytestmark = pytest.mark.usefixtures("no_real_data")

TINY = ["--hidden", "32,16", "--latent", "4", "--batch", "16", "--threads", "1", "--seed", "3"]




def train(capsys, data_dir, run, *more):
    return run_cli(capsys, "train", *TINY, "--epochs", "2", "--data", data_dir, "--out", run,
                   *more)


def prior_header(run):
    meta, _, _ = load_checkpoint(run / "prior.cvae", expected_kind="prior")
    return meta


def sidecar_extra(path):
    return json.loads(path.with_suffix(".json").read_text())["extra"]


def stop_prior_at(monkeypatch, epoch, signum):
    """Send ourselves `signum` when the prior finishes `epoch` (a real signal, as Ctrl-C)."""
    real = W.prior_progress

    def progress(mode, total, first, epochs):
        on_progress, on_epoch, close = real(mode, total, first, epochs)

        def epoch_end(number, loss, seconds):
            if on_epoch is not None:
                on_epoch(number, loss, seconds)
            if number == epoch:
                os.kill(os.getpid(), signum)

        return on_progress, epoch_end, close

    monkeypatch.setattr(W, "prior_progress", progress)


def test_train_with_the_flow_prior_writes_it_and_its_sheet(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    code, out, err = train(capsys, data_dir, run, "--prior", "flow", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]  # one JSON object per line
    assert [r["epoch"] for r in lines if "epoch" in r] == [1, 2]
    assert [r["prior_epoch"] for r in lines if "prior_epoch" in r] == list(
        range(1, P.DEFAULT_EPOCHS + 1))
    final = lines[-1]
    assert final["prior"] == str(run / "prior.cvae") and final["epochs"] == P.DEFAULT_EPOCHS
    assert final["codes"] == 200 and final["resumed"] is False and final["seconds"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert final["cvae_seconds"] == pytest.approx(sum(r["seconds"] for r in records))
    assert "images written" in err

    meta = prior_header(run)
    assert meta["complete"] and meta["cvae_checkpoint"] == "last.cvae"
    assert len(meta["epoch_losses"]) == P.DEFAULT_EPOCHS
    model, _ = R.open_model(run / "last.cvae", threads=1)  # in the run's precision
    assert meta["cvae_sha256"] == P.cvae_digest(model)
    assert json.loads((run / "config.json").read_text())["prior"] == "flow"

    flow, gaussian = run / "samples-flow.pgm", run / "samples.pgm"
    assert sidecar_extra(flow)["prior"] == "flow" and sidecar_extra(gaussian)["prior"] == "gaussian"
    assert sidecar_extra(flow)["seed"] == sidecar_extra(gaussian)["seed"] == 3
    flow_pixels, gaussian_pixels = read_pgm(flow), read_pgm(gaussian)
    assert flow_pixels.shape == gaussian_pixels.shape and not np.array_equal(flow_pixels,
                                                                              gaussian_pixels)
    # The sheet is the run's prior's: open_prior gives the same samples.
    again = tmp_path / "again.pgm"
    sheets.sample_sheets(model, tuple(range(10)), again, per_digit=10, seed=3, cols=10,
                         prior=R.open_prior("flow", run, model))
    np.testing.assert_array_equal(read_pgm(again), flow_pixels)


def test_the_priors_time_is_printed_beside_the_cvaes(capsys, tmp_path, data_dir):
    code, out, err = train(capsys, data_dir, tmp_path / "run", "--prior", "flow", "--no-images")
    assert code == 0, err
    assert f"flow prior: {P.DEFAULT_EPOCHS} epochs over 200 codes" in out
    (line,) = [line for line in out.splitlines() if line.startswith("training time:")]
    assert "CVAE" in line and "flow prior" in line and "of the CVAE's" in line
    assert f"prior epoch {P.DEFAULT_EPOCHS}:" in err  # the prior's progress is on stderr

    code, out, err = train(capsys, data_dir, tmp_path / "quiet", "--prior", "flow", "--quiet",
                           "--no-images")
    assert code == 0 and out == "" and err == ""


def test_the_flow_prior_is_the_default_and_gaussian_skips_it(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    code, out, err = train(capsys, data_dir, run)
    assert code == 0, err
    assert prior_header(run)["complete"] and (run / "samples-flow.pgm").is_file()
    assert "flow prior:" in out
    assert json.loads((run / "config.json").read_text())["prior"] == "flow"
    gauss = tmp_path / "g"
    code, _, err = train(capsys, data_dir, gauss, "--prior", "gaussian", "--quiet")
    assert code == 0, err
    assert not (gauss / "prior.cvae").exists() and not (gauss / "samples-flow.pgm").exists()
    assert json.loads((gauss / "config.json").read_text())["prior"] == "gaussian"
    # A run from before the flow prior was the default records no choice: it meant N(0, I),
    # so resuming it finds nothing to do rather than training a prior nobody asked for.
    config = json.loads((gauss / "config.json").read_text())
    del config["prior"]
    (gauss / "config.json").write_text(json.dumps(config))
    code, out, _ = run_cli(capsys, "train", "--resume", gauss)
    assert code == 0 and "nothing to do" in out and not (gauss / "prior.cvae").exists()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A run with its flow prior trained without a stop (no images)."""
    root = tmp_path_factory.mktemp("straight")
    run = root / "run"
    code = cli.main(["train", *TINY, "--epochs", "2", "--data", str(write_mnist_dir(root / "mnist")),
                     "--out", str(run), "--prior", "flow", "--quiet", "--no-images"])
    assert code == 0
    return run


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_the_prior_saves_it(capsys, tmp_path, data_dir, monkeypatch, straight,
                                          signum, exit_code):
    run = tmp_path / "run"
    before = signal.getsignal(signum)
    stop_prior_at(monkeypatch, 2, signum)
    code, out, err = train(capsys, data_dir, run, "--prior", "flow", "--quiet", "--no-images")
    assert code == exit_code and out == ""
    assert f"resume with: cvae train --resume {run}" in err and "Traceback" not in err
    assert signal.getsignal(signum) is before
    meta = prior_header(run)
    assert not meta["complete"] and meta["epoch_losses"] == prior_header(straight)["epoch_losses"][:2]
    assert (run / "last.cvae").read_bytes() == (straight / "last.cvae").read_bytes()


def test_resume_finishes_a_stopped_prior_exactly(capsys, tmp_path, data_dir, monkeypatch,
                                                 straight):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_prior_at(patch, 2, signal.SIGINT)
        assert train(capsys, data_dir, run, "--prior", "flow", "--quiet")[0] == 130
    assert not (run / "samples-flow.pgm").exists()  # the images come once the prior is done

    code, out, err = run_cli(capsys, "train", "--resume", run, "--json")  # the data: config.json's
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["prior_epoch"] for r in lines[:-1]] == list(range(3, P.DEFAULT_EPOCHS + 1))
    assert lines[-1]["resumed"] is True
    assert (run / "prior.cvae").read_bytes() == (straight / "prior.cvae").read_bytes()
    assert sidecar_extra(run / "samples-flow.pgm")["prior"] == "flow"

    code, out, err = run_cli(capsys, "train", "--resume", run)
    assert code == 0, err
    assert "already complete" in out and "flow prior" in out and "nothing to do" in out


def test_resume_of_a_stopped_run_ends_with_its_prior(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    code, _, err = train(capsys, data_dir, run, "--prior", "flow", "--quiet",
                         "--stop-after-epochs", "1")
    assert code == 0, err
    assert not (run / "prior.cvae").exists()
    code, _, err = run_cli(capsys, "train", "--resume", run, "--quiet")  # config.json: flow
    assert code == 0, err
    assert prior_header(run)["complete"] and (run / "samples-flow.pgm").is_file()


def test_resume_with_prior_flow_adds_one_to_a_finished_run(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    assert train(capsys, data_dir, run, "--quiet", "--prior", "gaussian")[0] == 0
    samples = (run / "samples.pgm").read_bytes()
    code, out, err = run_cli(capsys, "train", "--resume", run, "--prior", "flow", "--threads", 1)
    assert code == 0, err
    assert "flow prior:" in out and "training time:" in out
    assert prior_header(run)["complete"] and (run / "samples-flow.pgm").is_file()
    assert (run / "samples.pgm").read_bytes() == samples  # the same draws, redrawn
    assert json.loads((run / "config.json").read_text())["prior"] == "flow"
    code, out, _ = run_cli(capsys, "train", "--resume", run, "--prior", "flow")
    assert code == 0 and "nothing to do" in out
    # --prior gaussian is recorded too: the run no longer asks for its flow prior.
    code, out, _ = run_cli(capsys, "train", "--resume", run, "--prior", "gaussian")
    assert code == 0 and "nothing to do" in out
    assert json.loads((run / "config.json").read_text())["prior"] == "gaussian"


def test_a_prior_of_an_earlier_checkpoint_is_refused(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    assert train(capsys, data_dir, run, "--quiet", "--stop-after-epochs", "1")[0] == 0
    code, _, err = run_cli(capsys, "prior", "train", "--checkpoint", run, "--epochs", 1,
                           "--hidden", 32, "--blocks", 1, "--threads", 1, "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--resume", run, "--prior", "flow", "--quiet")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("cvae: error: ") and "prior of other CVAE parameters" in line
    assert "delete it" in line
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--prior", "bogus"], "--prior"),
    (["train", "--prior"], "--prior"),
])
def test_a_bad_prior_is_one_line_and_exit_2(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("cvae: error: ") and fragment in line and "Traceback" not in err
