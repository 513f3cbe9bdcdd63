"""A run directory that stays small and safe: epoch checkpoints kept by --keep, weights-only
export, one training process per run (a real second process), healing after a crash, a
SIGKILLed run resumed byte-identically, damaged optional files named, diverged parameters
never saved."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cvae import rundir as R
from cvae import workflows as W
from cvae.checkpoint import load_checkpoint
from cvae.errors import CvaeError
from cvae.model import Arch
from cvae.schedule import make_schedule
from cvae.train import Plan

from .conftest import assert_one_line_error, run_cli, subprocess_env

pytestmark = pytest.mark.usefixtures("no_real_data")  # resume finds the run's own data

TINY = ["--hidden", "32,16", "--latent", "4", "--batch", "16", "--threads", "1", "--seed", "3"]


def train(capsys, data_dir, run, *more):
    return run_cli(capsys, "train", *TINY, "--data", data_dir, "--out", run, "--no-images",
                   "--quiet", *more)


def epoch_files(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith("epoch-"))


def cvae_process(*argv):
    """`python -m cvae argv...` as its own process (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "cvae", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())


def wait_for(predicate, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- retention


def test_the_newest_three_epochs_are_kept_by_default(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    code, _, err = train(capsys, data_dir, run, "--epochs", "5")
    assert code == 0, err
    assert epoch_files(run) == ["epoch-0003.cvae", "epoch-0004.cvae", "epoch-0005.cvae"]
    assert (run / "last.cvae").read_bytes() == (run / "epoch-0005.cvae").read_bytes()
    assert json.loads((run / "config.json").read_text())["keep"] == 3


def test_keep_all_and_keep_one(capsys, tmp_path, data_dir):
    assert train(capsys, data_dir, tmp_path / "all", "--epochs", "4", "--keep", "all")[0] == 0
    assert len(epoch_files(tmp_path / "all")) == 4
    assert train(capsys, data_dir, tmp_path / "one", "--epochs", "4", "--keep", "1")[0] == 0
    assert epoch_files(tmp_path / "one") == ["epoch-0004.cvae"]
    code, _, err = train(capsys, data_dir, tmp_path / "bad", "--epochs", "1", "--keep", "0")
    assert_one_line_error(code, err, "--keep")
    assert not (tmp_path / "bad").exists()


def test_resume_with_retention_is_exact_and_keeps_the_runs_setting(capsys, tmp_path, data_dir):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(capsys, data_dir, straight, "--epochs", "5", "--keep", "2")[0] == 0
    assert train(capsys, data_dir, split, "--epochs", "5", "--keep", "2",
                 "--stop-after-epochs", "2")[0] == 0
    assert epoch_files(split) == ["epoch-0001.cvae", "epoch-0002.cvae"]
    code, _, err = run_cli(capsys, "train", "--resume", split, "--quiet", "--no-images")
    assert code == 0, err
    assert epoch_files(split) == ["epoch-0004.cvae", "epoch-0005.cvae"]  # the run's keep: 2
    for name in ("last.cvae", "epoch-0004.cvae", "epoch-0005.cvae"):
        assert (split / name).read_bytes() == (straight / name).read_bytes()


# ---------------------------------------------------------------- export


def test_export_writes_weights_that_the_reading_commands_take(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    assert train(capsys, data_dir, run, "--epochs", "1", "--prior", "flow")[0] == 0
    out = tmp_path / "shipped" / "model.cvae"
    out.parent.mkdir()
    code, text, err = run_cli(capsys, "export", run, "--out", out, "--with-prior")
    assert code == 0, err and "exported" in text
    meta, sections, _ = load_checkpoint(out, expected_kind="cvae")
    assert sections and all(name.startswith("param.") for name in sections)
    assert os.path.getsize(out) < os.path.getsize(run / "last.cvae") / 2
    prior_meta, prior_sections, _ = load_checkpoint(out.parent / "prior.cvae")
    assert prior_meta["complete"] and all(n.startswith("param.") for n in prior_sections)
    # The same samples as the run's own checkpoint and prior.
    for checkpoint, sheet in ((run, tmp_path / "a.pgm"), (out, tmp_path / "b.pgm")):
        code, text, err = run_cli(capsys, "generate", "--checkpoint", checkpoint, "--out", sheet,
                                  "--threads", "1")
        assert code == 0 and "flow prior" in text, err
    assert (tmp_path / "a.pgm").read_bytes() == (tmp_path / "b.pgm").read_bytes()
    for argv in (["eval", "--checkpoint", out, "--data", data_dir, "--k", "2", "--samples", "5"],
                 ["reconstruct", "--checkpoint", out, "--data", data_dir],
                 ["interpolate", "--checkpoint", out, "--data", data_dir],
                 ["report", out.parent, "--data", data_dir]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, (argv, err)
    # Never replaces a file; an exported model cannot be resumed.
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "export", run, "--out", out)
    assert_one_line_error(code, err, "exists")
    assert out.read_bytes() == before
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(out, lone / "last.cvae")
    code, _, err = run_cli(capsys, "train", "--resume", lone, "--quiet")
    assert_one_line_error(code, err, "no optimizer state")


# ---------------------------------------------------------------- one training per run


def test_a_second_training_of_a_run_in_training_is_refused(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    first = cvae_process("train", *TINY, "--data", data_dir, "--out", run, "--epochs", "400",
                         "--no-images", "--quiet")
    try:
        wait_for(lambda: (run / "last.cvae").exists())
        for argv in (["train", "--resume", run, "--quiet"],
                     ["prior", "train", "--checkpoint", run, "--quiet"]):
            code, _, err = run_cli(capsys, *argv)
            assert_one_line_error(code, err, "is being trained by process", str(first.pid))
        # Reading commands go on while it trains.
        code, _, err = run_cli(capsys, "generate", "--checkpoint", run, "--out",
                               tmp_path / "g.pgm", "--threads", "1")
        assert code == 0, err
        # A lock left by a killed process is taken over.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        code, _, err = run_cli(capsys, "train", "--resume", run, "--quiet", "--no-images",
                               "--stop-after-epochs", "1")
        assert code == 0, err
    finally:
        first.kill()
        first.communicate()
    assert not (run / R.LOCK).exists()


def test_a_failed_start_leaves_no_directory(capsys, tmp_path):
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "train", *TINY, "--data", tmp_path / "no-data", "--out", out,
                           "--quiet")
    assert code == 2, err
    assert not out.exists()


# ---------------------------------------------------------------- crashes


def test_sigkill_then_resume_is_byte_identical(capsys, tmp_path, data_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(capsys, data_dir, straight, "--epochs", "40", "--keep", "all")[0] == 0
    process = cvae_process("train", *TINY, "--data", data_dir, "--out", killed, "--epochs", "40",
                           "--keep", "all", "--no-images", "--quiet")
    # (a run this small may even finish first: then the resume has nothing to do)
    wait_for(lambda: (killed / "epoch-0002.cvae").exists() or process.poll() is not None)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    code, _, err = run_cli(capsys, "train", "--resume", killed, "--quiet", "--no-images")
    assert code == 0, err
    assert (killed / "last.cvae").read_bytes() == (straight / "last.cvae").read_bytes()
    strip = lambda r: {k: v for k, v in r.items() if k not in ("img_per_s", "seconds")}  # noqa: E731
    assert [strip(r) for r in R.read_metrics(killed)] == [strip(r) for r in
                                                            R.read_metrics(straight)]


def test_resume_heals_a_cut_metrics_line_and_stray_temp_files(capsys, tmp_path, data_dir):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert train(capsys, data_dir, straight, "--epochs", "3")[0] == 0
    assert train(capsys, data_dir, run, "--epochs", "3", "--stop-after-epochs", "2")[0] == 0
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "step": 3')  # a crash mid-append
    (run / ".last.cvae.abc123.tmp").write_bytes(b"half a checkpoint")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--quiet", "--no-images")
    assert code == 0, err
    assert "removed" in err and ".last.cvae.abc123.tmp" in err
    assert "metrics.jsonl line 3" in err and "repaired" in err
    assert not (run / ".last.cvae.abc123.tmp").exists()
    assert [r["epoch"] for r in R.read_metrics(run)] == [1, 2, 3]
    assert (run / "last.cvae").read_bytes() == (straight / "last.cvae").read_bytes()


def test_damaged_metrics_lines_are_named_not_used(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    assert train(capsys, data_dir, run, "--epochs", "2")[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["test_neg_elbo"] = "lots"
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    problems = []
    assert [r["epoch"] for r in R.read_metrics(run, problems=problems)] == [1]
    assert problems == ["metrics.jsonl line 2: its test_neg_elbo is 'lots', not a number; left out"]
    code, out, err = run_cli(capsys, "report", run, "--data", data_dir)
    assert code == 0, err
    assert "note: metrics.jsonl line 2: its test_neg_elbo is 'lots'" in out
    assert "lots" not in (run / "report.html").read_text().split('id="training"')[1].split(
        "</section>")[0].split("</p>", 1)[1]


# ---------------------------------------------------------------- non-finite parameters


def test_a_diverged_model_is_never_saved(tmp_path, data_dir):
    plan = Plan(arch=Arch(h1=32, h2=16, latent=4), digits=tuple(range(10)),
                schedule=make_schedule("constant", 1e-3), epochs=3, seed=0, batch=16, lr=1e-3,
                data={})

    def poison(trainer, step):
        if step == 15:  # in epoch 2 (13 steps an epoch): a NaN weight the loss does not see yet
            trainer.model.params["dec3.b"][0] = np.nan

    trainer = W.start_run(tmp_path / "run", plan, data_dir, 1, after_step=poison)
    good = None
    with pytest.raises(CvaeError, match="diverged"):
        try:
            trainer.run()
        finally:
            good = sorted(epoch_files(tmp_path / "run"))
    assert good == ["epoch-0001.cvae"]
    meta, sections, _ = load_checkpoint(tmp_path / "run" / "last.cvae")
    assert meta["epoch"] == 1 and all(np.isfinite(a).all() for a in sections.values())
