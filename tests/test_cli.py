"""The command line: one-line errors with exit 2, --version, info, data, train/resume end to end."""

import json
import os
import signal
import subprocess
import sys

import pytest

import cvae
from cvae.checkpoint import load_checkpoint
from .conftest import (REAL, assert_one_line_error, needs_real_data, run_cli, subprocess_env,
                       write_mnist_dir)

pytestmark = pytest.mark.usefixtures("no_real_data")

TINY_ARGS = ["--hidden", "32,16", "--latent", "4", "--batch", "16", "--threads", "1", "--no-images",
             "--prior", "gaussian"]


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--epochs", "x"], "--epochs"),
    (["train", "--batch", "-1"], "--batch"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--digits", "12"], "--digits"),
    (["train", "--digits", "5-2"], "backwards"),
    (["train", "--hidden", "64"], "--hidden"),
    (["train", "--variant", "huge"], "--variant"),
    (["train", "--seed", "-3"], "--seed"),
    (["train", "--beta", "0.5"], "--beta is for --schedule constant"),
    (["train", "--schedule-set", "warp=2"], "warp"),
    (["train", "--schedule-set", "fast=0.8", "--schedule-set", "balanced=0.5"], "exceed 1"),
    (["train", "--json", "--quiet"], "not allowed"),
    (["train", "--resume", "/nonexistent/run"], "/nonexistent/run"),
    (["info", "--latent", "0"], "--latent"),
    (["frobnicate"], "frobnicate"),
    ([], "required"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, fragment):
    code, out, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "r")] if argv[:1] == ["train"]
                                               and "--resume" not in argv else []))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists() or not os.listdir(tmp_path / "r")


def test_missing_data_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--data", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "nowhere")
    assert not (tmp_path / "run").exists()


def test_version(capsys):
    from cvae.kernels import build_name, kernels

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0
    assert cvae.__version__ in out and build_name() in out and kernels().isa in out


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["train", "--help"], ["info", "--help"], ["data", "--help"],
                 ["data", "fetch", "--help"], ["data", "verify", "--help"]):
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and "usage: cvae" in out
    _, out, _ = run_cli(capsys, "train", "--help")
    for text in ("progressive", "near-autoencoder", "(default: 64)", "--resume", "--stop-after-epochs"):
        assert text in out


def test_info(capsys):
    from cvae.model import Arch

    code, out, _ = run_cli(capsys, "info", "--variant", "mini", "--threads", "1", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["n_params"] == Arch.variant("mini").n_params()
    assert set(info["slab_mb"]) == {"param", "grad", "adam_m", "adam_v", "act", "actgrad", "per_sample", "scratch"}
    assert info["total_mb"] == pytest.approx(sum(info["slab_mb"].values()))
    assert info["slab_floats"]["param"] >= info["n_params"]
    code, out, _ = run_cli(capsys, "info", "--hidden", "100,50", "--latent", "8", "--threads", "1")
    assert code == 0 and "total" in out and f"{Arch(100, 50, 8).n_params():,}" in out


def test_data_verify(capsys, data_dir):
    code, _, err = run_cli(capsys, "data", "verify", "--data", str(data_dir))
    assert code == 2 and "published checksums" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


@needs_real_data
def test_data_verify_real(capsys):
    code, out, _ = run_cli(capsys, "data", "verify", "--data", REAL)
    assert code == 0 and "match" in out


def test_train_json_then_clobber_then_resume(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "3", "--data", str(data_dir),
                             "--out", str(run), "--json", "--stop-after-epochs", "2")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "--resume" in err

    before = (run / "last.cvae").read_bytes()
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--data", str(data_dir), "--out", str(run))
    assert_one_line_error(code, err, "--resume", str(run))
    assert (run / "last.cvae").read_bytes() == before

    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--lr", "0.5")
    assert_one_line_error(code, err, "--lr")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "9")
    assert_one_line_error(code, err, "--epochs")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--variant", "mini")
    assert_one_line_error(code, err, "architecture")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--out", str(tmp_path / "elsewhere"))
    assert_one_line_error(code, err, "--out")
    assert (run / "last.cvae").read_bytes() == before

    # Matching options are fine; the data directory comes from config.json.
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--batch", "16", "--threads", "2",
                             "--json", "--no-images")
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in out.splitlines()] == [3]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    code, out, _ = run_cli(capsys, "train", "--resume", str(run), "--quiet")
    assert code == 0 and out == ""


def test_rich_display_and_quiet(capsys, tmp_path, data_dir):
    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "2", "--data", str(data_dir),
                             "--out", str(tmp_path / "a"))
    assert code == 0, err
    assert "epoch 2/2" in out and "-ELBO" in out
    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "1", "--data", str(data_dir),
                             "--out", str(tmp_path / "b"), "--quiet")
    assert code == 0 and out == "" and err == ""


def test_variant_digits_default_and_images_hook(capsys, tmp_path, data_dir, monkeypatch):
    from cvae import rundir

    calls = []
    monkeypatch.setattr(rundir, "write_run_images",
                        lambda model, test, run_dir, seed, digits, records, flow=None:
                        calls.append((test, run_dir, seed, digits, flow)))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--variant", "mini", "--hidden", "32,16", "--latent", "4",
                           "--batch", "16", "--threads", "1", "--epochs", "1", "--seed", "5",
                           "--data", str(data_dir), "--out", str(run), "--quiet", "--prior",
                           "gaussian")
    assert code == 0, err
    meta, _, _ = load_checkpoint(run / "last.cvae")
    assert meta["digits"] == [0, 1]
    ((test, run_dir, seed, digits, flow),) = calls
    assert set(test.labels) <= {0, 1} and os.path.samefile(run_dir, run) and seed == 5 and tuple(digits) == (0, 1)
    assert flow is None  # --prior gaussian: N(0, I) only

    calls.clear()
    code, _, _ = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "1", "--data", str(data_dir),
                         "--out", str(tmp_path / "run2"), "--quiet")
    assert code == 0 and calls == []  # --no-images


def test_empty_cache_is_fetched_first(capsys, tmp_path, monkeypatch):
    from cvae import fetch

    fetched = []

    def fake_fetch(cache_dir, log=print, **kwargs):
        fetched.append(cache_dir)
        write_mnist_dir(cache_dir)
        return cache_dir

    monkeypatch.setattr(fetch, "fetch_mnist", fake_fetch)
    code, out, err = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert [str(p) for p in fetched] == [str(tmp_path / "cache")]
    assert "fetching" in out.splitlines()[0]


def test_default_out(capsys, tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "1", "--data", str(data_dir), "--quiet")
    assert code == 0, err
    (name,) = os.listdir(tmp_path / "runs")
    assert name.startswith("full-") and (tmp_path / "runs" / name / "last.cvae").is_file()


def test_subprocess_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "cvae", "train", "--epochs", "0"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("cvae: error: ") and "Traceback" not in proc.stderr


def test_subprocess_sigint_saves_and_resumes(tmp_path, data_dir):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "cvae", "train", *TINY_ARGS, "--epochs", "400", "--data", str(data_dir),
            "--out", str(run), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        first = proc.stdout.readline()  # epoch 1 done: the handlers are in place
        assert json.loads(first)["epoch"] == 1
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "resume with: cvae train --resume" in err and "Traceback" not in err
    meta, _, _ = load_checkpoint(run / "last.cvae")
    assert 1 <= meta["epoch"] < 400 and meta["step"] >= 13

    proc = subprocess.run([sys.executable, "-m", "cvae", "train", "--resume", str(run), "--threads", "1",
                           "--stop-after-epochs", "1", "--json"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["epoch"] == meta["epoch"] + 1


def test_resuming_on_another_kernel_build_warns(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--epochs", "2", "--data", str(data_dir),
                           "--out", str(run), "--json", "--stop-after-epochs", "1")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    config["kernels"] = "some-other-build"
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--json", "--no-images")
    assert code == 0, err
    assert "warning" in err and "some-other-build" in err and "bit-identical" in err
