"""The flow prior's command line: `cvae prior train`, and `generate` / `eval` with --prior.

Every bad input is one line on stderr ("cvae: error: ..."), exit 2, no traceback, and leaves
the run directory as it was (nothing half-written, no file clobbered). The good paths: prior
train writes prior.cvae, generate uses it by default and says so in its sidecar, --prior
gaussian is the N(0, I) sheet, seeds and --threads are reproducible to the byte, Ctrl-C saves
and --resume completes, eval scores both priors.

Everything runs on two tiny CVAE runs (synthetic IDX files, 200 training images, 1 epoch),
built once per module, each with a tiny prior (hidden 16, one block).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvae import cli
from cvae.checkpoint import load_checkpoint
from cvae.classifier import SHIPPED
from cvae import prior as P
from .conftest import assert_one_line_error, run_cli, subprocess_env, write_mnist_dir

pytestmark = pytest.mark.usefixtures("no_real_data")

CVAE_ARGS = ["--hidden", "32,16", "--latent", "4", "--batch", "16", "--threads", "1",
             "--no-images", "--epochs", "1", "--quiet", "--prior", "gaussian"]
PRIOR_ARGS = ["--hidden", "16", "--blocks", "1", "--epochs", "2", "--batch", "32",
              "--threads", "1"]
GEN_ARGS = ["--per-digit", "3", "--threads", "1"]
EVAL_ARGS = ["--k", "2", "--samples", "10", "--threads", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two CVAE runs of different seeds ("a", "b") on tiny IDX data, each with its prior, and
    "a-bare": run a before its prior was trained."""
    root = tmp_path_factory.mktemp("prior-cli")
    data = write_mnist_dir(root / "mnist")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CVAE_DATA", raising=False)
        mp.setenv("CVAE_CACHE", str(root / "cache"))
        for name, seed in (("a", 1), ("b", 2)):
            code = cli.main(["train", *CVAE_ARGS, "--seed", str(seed), "--data", str(data),
                             "--out", str(root / name)])
            assert code == 0
        shutil.copytree(root / "a", root / "a-bare")
        for name in ("a", "b"):
            code = cli.main(["prior", "train", "--checkpoint", str(root / name), *PRIOR_ARGS,
                             "--quiet"])
            assert code == 0
    assert (root / "a" / "last.cvae").read_bytes() != (root / "b" / "last.cvae").read_bytes()
    return {"root": root, "data": data, "a": root / "a", "b": root / "b",
            "bare": root / "a-bare"}




def snapshot(directory):
    """{relative path: bytes} of every file under directory."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_run(source, dest, sentinels=True):
    """A copy of a run; with sentinels, earlier generate/eval outputs an error must not clobber."""
    shutil.copytree(source, dest)
    if sentinels:
        for name in ("generate.pgm", "generate.json", "eval.json"):
            (dest / name).write_bytes(b"an earlier output, not to be clobbered\n")
    return dest


def generate(run, *extra):
    return ["generate", "--checkpoint", run, *GEN_ARGS, *extra]


def evaluate(world, run, *extra):
    return ["eval", "--checkpoint", run, "--data", world["data"], *EVAL_ARGS, *extra]


def expect_error(capsys, run, argv, *fragments):
    """argv fails with one line and exit 2, and the run directory is byte for byte as before."""
    before = snapshot(run)
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(run) == before, "the failed command changed the run directory"
    return err


def falls_back_to_gaussian(capsys, argv, *fragments):
    """argv runs (exit 0) with N(0, I), after one 'cvae: note:' line naming why."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    (note,) = err.strip().splitlines()
    assert note.startswith("cvae: note: ") and "N(0, I)" in note, note
    assert all(f in note for f in fragments), note
    return out


def sidecar_extra(pgm):
    return json.loads(Path(pgm).with_suffix(".json").read_text())["extra"]


# ---------------------------------------------------------------- bad input


def test_prior_train_help(capsys):
    code, out, _ = run_cli(capsys, "prior", "train", "--help")
    assert code == 0 and "usage: cvae prior train" in out
    for option in ("--checkpoint", "--resume", "--drop", "--blocks", "--hidden", "--json"):
        assert option in out
    code, out, _ = run_cli(capsys, "prior", "--help")
    assert code == 0 and "train" in out
    code, out, err = run_cli(capsys, "prior")
    assert_one_line_error(code, err)
    for command in ("generate", "eval"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0
        for option in ("--prior", "--steps", "--method", "--guidance"):
            assert option in out


def test_flow_prior_on_a_run_without_one(capsys, world, tmp_path):
    run = copy_run(world["bare"], tmp_path / "run")
    expect_error(capsys, run, generate(run, "--prior", "flow"), "no flow prior", "prior train")
    expect_error(capsys, run, evaluate(world, run, "--prior", "flow"), "no flow prior")
    expect_error(capsys, run, evaluate(world, run, "--prior", "both"), "no flow prior")
    # An explicit checkpoint file finds (no) prior beside it all the same.
    expect_error(capsys, run, generate(run / "last.cvae", "--prior", "flow"), "no flow prior")


def test_prior_of_another_cvae(capsys, world, tmp_path):
    run = copy_run(world["bare"], tmp_path / "run")
    shutil.copy(world["b"] / "prior.cvae", run / "prior.cvae")
    expect_error(capsys, run, generate(run), "another CVAE", "none of this run's checkpoints")
    expect_error(capsys, run, evaluate(world, run), "another CVAE")
    expect_error(capsys, run, generate(run, "--prior", "flow"), "another CVAE")
    expect_error(capsys, run, evaluate(world, run, "--prior", "flow"), "another CVAE")
    expect_error(capsys, run, evaluate(world, run, "--prior", "both"), "another CVAE")
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run, "--resume"],
                 "another CVAE")
    # The N(0, I) prior still works without it.
    code, _, err = run_cli(capsys, *generate(run, "--prior", "gaussian", "--out",
                                             tmp_path / "g.pgm"))
    assert code == 0, err


def test_an_earlier_checkpoint_of_a_run_with_a_prior(capsys, world, tmp_path):
    """The prior belongs to the run's newest checkpoint: asked for an earlier one, generate
    and eval pass it over with a note by default, and refuse it when asked for."""
    from cvae.checkpoint import save_checkpoint

    run = copy_run(world["a"], tmp_path / "run", sentinels=False)
    meta, sections, header = load_checkpoint(run / "last.cvae")
    sections = {k: np.array(v) for k, v in sections.items()}
    sections["param.dec3.b"][0] += 1e-3   # an 'earlier' checkpoint: other parameters
    save_checkpoint(run / "epoch-0000.cvae", header["kind"], meta, sections)
    earlier = run / "epoch-0000.cvae"
    falls_back_to_gaussian(capsys, generate(earlier, "--out", tmp_path / "d.pgm"),
                           "newest checkpoint")
    assert sidecar_extra(tmp_path / "d.pgm")["prior"] == "gaussian"
    out = falls_back_to_gaussian(capsys, evaluate(world, earlier, "--classifier", SHIPPED,
                                                  "--json"), "newest checkpoint")
    assert list(json.loads(out)["by_prior"]) == ["gaussian"]
    expect_error(capsys, run, generate(earlier, "--prior", "flow"), "another CVAE")
    code, out, err = run_cli(capsys, *generate(run / "last.cvae", "--out", tmp_path / "f.pgm"))
    assert code == 0 and err == "" and sidecar_extra(tmp_path / "f.pgm")["prior"] == "flow"


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_last_byte(path):
    path.write_bytes(path.read_bytes()[:-1])


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, _drop_last_byte, _empty],
                         ids=["flipped-byte", "truncated", "last-byte-missing", "empty"])
def test_damaged_prior(capsys, world, tmp_path, damage):
    run = copy_run(world["a"], tmp_path / "run")
    damage(run / "prior.cvae")
    expect_error(capsys, run, generate(run), "prior.cvae")
    expect_error(capsys, run, generate(run, "--prior", "flow"), "prior.cvae")
    expect_error(capsys, run, evaluate(world, run), "prior.cvae")
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run, "--resume"], "prior.cvae")
    code, _, err = run_cli(capsys, *generate(run, "--prior", "gaussian", "--out",
                                             tmp_path / "g.pgm"))
    assert code == 0, err


def test_a_cvae_checkpoint_is_not_a_prior(capsys, world, tmp_path):
    run = copy_run(world["bare"], tmp_path / "run")
    shutil.copy(run / "last.cvae", run / "prior.cvae")
    expect_error(capsys, run, generate(run), "prior.cvae")
    expect_error(capsys, run, evaluate(world, run, "--prior", "flow"), "prior.cvae")


def test_prior_train_refuses_to_replace_a_prior(capsys, world, tmp_path):
    run = copy_run(world["a"], tmp_path / "run", sentinels=False)
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run, *PRIOR_ARGS],
                 "already has a prior", "--resume")
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run / "last.cvae"],
                 "already has a prior")


def test_resume_needs_a_prior_and_its_own_settings(capsys, world, tmp_path):
    bare = copy_run(world["bare"], tmp_path / "bare", sentinels=False)
    expect_error(capsys, bare, ["prior", "train", "--checkpoint", bare, "--resume"],
                 "--resume", "no prior.cvae")
    assert not (bare / "prior.cvae").exists()
    run = copy_run(world["a"], tmp_path / "run", sentinels=False)
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run, "--resume", "--epochs", "5"],
                 "--epochs")
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run, "--resume", "--hidden", "8",
                               "--lr", "0.1"], "--hidden", "--lr")
    # A complete prior resumed: nothing left to do, and nothing changes.
    before = snapshot(run)
    code, out, err = run_cli(capsys, "prior", "train", "--checkpoint", run, "--resume", "--quiet")
    assert code == 0 and out == "" and "Traceback" not in err, err
    assert snapshot(run) == before


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--steps", "0"], "--steps"),
    (["generate", "--steps", "-2"], "--steps"),
    (["generate", "--guidance", "-1"], "--guidance"),
    (["generate", "--guidance", "nan"], "--guidance"),
    (["generate", "--guidance", "inf"], "--guidance"),
    (["generate", "--method", "bogus"], "--method"),
    (["generate", "--prior", "bogus"], "--prior"),
    (["generate", "--prior", "both"], "--prior"),
    (["eval", "--steps", "0"], "--steps"),
    (["eval", "--guidance", "-1"], "--guidance"),
    (["eval", "--method", "bogus"], "--method"),
    (["eval", "--prior", "bogus"], "--prior"),
    (["prior", "train", "--drop", "1.5"], "--drop"),
    (["prior", "train", "--drop", "-0.1"], "--drop"),
    (["prior", "train", "--drop", "1"], "--drop"),
    (["prior", "train", "--blocks", "9"], "--blocks"),
    (["prior", "train", "--blocks", "0"], "--blocks"),
    (["prior", "train", "--blocks", "x"], "--blocks"),
    (["prior", "train", "--epochs", "0"], "--epochs"),
    (["prior", "train", "--hidden", "0"], "--hidden"),
    (["prior", "train", "--batch", "-1"], "--batch"),
    (["prior", "train", "--lr", "0"], "--lr"),
    (["prior", "train", "--seed", "-1"], "--seed"),
    (["prior", "train", "--threads", "0"], "--threads"),
    (["prior", "train", "--json", "--quiet"], "not allowed"),
])
def test_bad_options(capsys, world, tmp_path, argv, fragment):
    # prior train on the bare run (it would train one), generate/eval on the run with a prior.
    run = copy_run(world["bare" if argv[0] == "prior" else "a"], tmp_path / "run")
    extra = (["--data", world["data"], "--k", "2", "--samples", "10"] if argv[0] == "eval"
             else [])
    expect_error(capsys, run, [*argv, "--checkpoint", run, *extra], fragment)
    assert (run / "prior.cvae").exists() == (argv[0] != "prior")


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("prior", ["gaussian", None], ids=["gaussian", "default"])
@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--guidance", "-1")])
def test_bad_sampling_options_whatever_the_prior(capsys, world, tmp_path, command, prior, option,
                                                 value):
    """--steps 0 and --guidance -1 are as wrong with the N(0, I) prior (asked for, or the
    default of a run without prior.cvae) as with the flow: an error, like --method bogus or
    --temperature -1, not silently ignored."""
    run = copy_run(world["bare"], tmp_path / "run")
    argv = generate(run) if command == "generate" else evaluate(world, run)
    expect_error(capsys, run, [*argv, *(["--prior", prior] if prior else []), option, value],
                 option)


def test_prior_train_data_must_match_the_run(capsys, world, tmp_path):
    run = copy_run(world["bare"], tmp_path / "run")
    other = write_mnist_dir(tmp_path / "other", n_train=120, n_test=30)
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run, *PRIOR_ARGS,
                               "--data", other], "200", "120")
    expect_error(capsys, run, ["prior", "train", "--checkpoint", run, *PRIOR_ARGS,
                               "--data", tmp_path / "nowhere"], "nowhere")
    assert not (run / "prior.cvae").exists()
    # Without --data, the run's own data directory (config.json) is used.
    code, _, err = run_cli(capsys, "prior", "train", "--checkpoint", run, *PRIOR_ARGS, "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("command", ["prior", "generate", "eval"])
def test_checkpoint_that_does_not_exist(capsys, world, tmp_path, command):
    argv = {"prior": ["prior", "train"], "generate": ["generate"],
            "eval": ["eval", "--data", world["data"]]}[command]
    missing = tmp_path / "no-such-run"
    code, _, err = run_cli(capsys, *argv, "--checkpoint", missing)
    assert_one_line_error(code, err, str(missing))
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, *argv, "--checkpoint", empty)
    assert_one_line_error(code, err, "no checkpoint")
    assert os.listdir(empty) == []


def test_subprocess_errors_are_one_line(world, tmp_path):
    run = copy_run(world["a"], tmp_path / "run")
    before = snapshot(run)
    for argv in (["prior", "train", "--checkpoint", str(tmp_path / "nowhere")],
                 ["prior", "train", "--checkpoint", str(run)],
                 ["generate", "--checkpoint", str(run), "--steps", "0"]):
        proc = subprocess.run([sys.executable, "-m", "cvae", *argv], capture_output=True,
                              text=True, env=subprocess_env(), timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("cvae: error: ") and "Traceback" not in proc.stderr
        assert proc.stdout == ""
    assert snapshot(run) == before


# ---------------------------------------------------------------- good paths


def test_prior_train_writes_a_complete_prior(world):
    meta, sections, _ = load_checkpoint(world["a"] / "prior.cvae", expected_kind="prior")
    assert meta["complete"] is True
    assert meta["arch"]["hidden"] == 16 and meta["arch"]["blocks"] == 1
    dims = meta["arch"]["dims"]   # the CVAE's active dimensions, out of its 4
    assert meta["arch"]["latent"] == len(dims) >= 1 and set(dims) <= set(range(4))
    assert meta["epochs"] == 2 and len(meta["epoch_losses"]) == 2
    assert meta["batch"] == 32 and meta["cvae_checkpoint"] == "last.cvae"
    assert any(name.startswith("adam_") for name in sections)
    other, _, _ = load_checkpoint(world["b"] / "prior.cvae", expected_kind="prior")
    assert other["cvae_sha256"] != meta["cvae_sha256"]


def test_prior_train_json_lines(capsys, world, tmp_path):
    run = copy_run(world["bare"], tmp_path / "run", sentinels=False)
    code, out, err = run_cli(capsys, "prior", "train", "--checkpoint", run, *PRIOR_ARGS,
                             "--epochs", "3", "--json")
    assert code == 0, err
    lines = out.splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    assert [r["prior_epoch"] for r in records[:-1]] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in records[:-1])
    final = records[-1]
    assert final["prior"] == str((run / "prior.cvae").resolve()) or \
        os.path.samefile(final["prior"], run / "prior.cvae")
    assert final["epochs"] == 3 and final["codes"] == 200 and final["threads"] == 1
    assert final["loss"] == records[-2]["loss"]
    meta, _, _ = load_checkpoint(run / "prior.cvae", expected_kind="prior")
    assert meta["complete"] and meta["epoch_losses"] == [r["loss"] for r in records[:-1]]
    # Quiet prints nothing; the default prints one summary line to stdout.
    quiet = copy_run(world["bare"], tmp_path / "quiet", sentinels=False)
    code, out, err = run_cli(capsys, "prior", "train", "--checkpoint", quiet, *PRIOR_ARGS,
                             "--quiet")
    assert code == 0 and out == "" and err == ""
    plain = copy_run(world["bare"], tmp_path / "plain", sentinels=False)
    code, out, err = run_cli(capsys, "prior", "train", "--checkpoint", plain, *PRIOR_ARGS)
    assert code == 0 and out.startswith("flow prior: 2 epochs over 200 codes"), out


def test_generate_defaults_to_flow_and_gaussian_is_the_n01_sheet(capsys, world, tmp_path):
    run = world["a"]
    flow, gauss, plain = tmp_path / "flow.pgm", tmp_path / "gauss.pgm", tmp_path / "plain.pgm"
    code, out, err = run_cli(capsys, *generate(run, "--out", flow))
    assert code == 0, err
    assert "flow prior: midpoint, 2 steps, guidance 2" in out
    extra = sidecar_extra(flow)
    assert extra["prior"] == "flow"
    # relative to the sheet's directory: no machine paths in the sidecar
    assert os.path.samefile(flow.parent / extra["prior_file"], run / "prior.cvae")
    assert (extra["steps"], extra["method"], extra["guidance"]) == (
        P.DEFAULT_STEPS, P.DEFAULT_METHOD, P.DEFAULT_GUIDANCE) == (2, "midpoint", 2.0)

    code, out, err = run_cli(capsys, *generate(run, "--prior", "gaussian", "--out", gauss))
    assert code == 0, err
    assert "N(0, I) prior" in out
    extra = sidecar_extra(gauss)
    assert extra["prior"] == "gaussian"
    assert not {"prior_file", "steps", "method", "guidance"} & extra.keys()
    # The run without a prior draws the same N(0, I) sheet by default.
    code, _, err = run_cli(capsys, *generate(world["bare"], "--out", plain))
    assert code == 0, err
    assert sidecar_extra(plain)["prior"] == "gaussian"
    assert gauss.read_bytes() == plain.read_bytes()
    assert flow.read_bytes() != gauss.read_bytes()

    # The sampling options are used and recorded.
    other = tmp_path / "euler.pgm"
    code, out, err = run_cli(capsys, *generate(run, "--steps", "3", "--method", "euler",
                                               "--guidance", "0.5", "--out", other))
    assert code == 0, err
    assert "euler, 3 steps, guidance 0.5" in out
    extra = sidecar_extra(other)
    assert (extra["prior"], extra["steps"], extra["method"], extra["guidance"]) == (
        "flow", 3, "euler", 0.5)
    assert other.read_bytes() != flow.read_bytes()


def test_same_seed_same_sheet(capsys, world, tmp_path):
    sheets = {}
    for name, seed in (("one", 5), ("two", 5), ("three", 6)):
        path = tmp_path / f"{name}.pgm"
        code, _, err = run_cli(capsys, *generate(world["a"], "--seed", seed, "--out", path))
        assert code == 0, err
        sheets[name] = path.read_bytes()
    assert sheets["one"] == sheets["two"]
    assert sheets["one"] != sheets["three"]


def test_threads_1_and_2_give_the_same_prior_and_sheets(capsys, world, tmp_path):
    priors = {}
    for threads in (1, 2):
        run = copy_run(world["bare"], tmp_path / f"t{threads}", sentinels=False)
        code, _, err = run_cli(capsys, "prior", "train", "--checkpoint", run, *PRIOR_ARGS,
                               "--threads", threads, "--quiet")
        assert code == 0, err
        priors[threads] = (run / "prior.cvae").read_bytes()
    assert priors[1] == priors[2], "--threads 1 and --threads 2 trained different priors"
    assert priors[1] == (world["a"] / "prior.cvae").read_bytes()
    sheets = {}
    for threads in (1, 2):
        out = tmp_path / f"gen{threads}.pgm"
        code, _, err = run_cli(capsys, "generate", "--checkpoint", world["a"], "--per-digit", 3,
                               "--threads", threads, "--out", out)
        assert code == 0, err
        sheets[threads] = out.read_bytes()
    assert sheets[1] == sheets[2]


def test_sigint_saves_the_prior_and_resume_completes_it(capsys, world, tmp_path):
    """Ctrl-C after the first epoch (of about 4 s of training): exit 130, prior.cvae saved
    and marked incomplete; --resume finishes it, byte for byte the prior an uninterrupted run
    trains."""
    run = copy_run(world["bare"], tmp_path / "run", sentinels=False)
    epochs = 400
    settings = ["--hidden", "16", "--blocks", "1", "--batch", "4", "--epochs", str(epochs),
                "--threads", "1"]
    argv = [sys.executable, "-m", "cvae", "prior", "train", "--checkpoint", str(run), *settings,
            "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        first = proc.stdout.readline()  # epoch 1 done: the handlers are in place
        assert json.loads(first)["prior_epoch"] == 1, first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in err and "SIGINT" in err, err
    meta, _, _ = load_checkpoint(run / "prior.cvae", expected_kind="prior")
    assert meta["complete"] is False
    assert 1 <= len(meta["epoch_losses"]) < epochs and 50 <= meta["step"] < 50 * epochs

    # A partly trained prior is not used for sampling: passed over by default, refused when
    # asked for.
    proc = subprocess.run([sys.executable, "-m", "cvae", "generate", "--checkpoint", str(run),
                           "--threads", "1", "--per-digit", "2", "--prior", "flow"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 2 and "partly trained" in proc.stderr and "--resume" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (run / "generate.pgm").exists()
    expect_error(capsys, run, evaluate(world, run, "--prior", "flow"), "partly trained")
    falls_back_to_gaussian(capsys, generate(run, "--out", tmp_path / "partial.pgm"),
                           "partly trained", "--resume")

    proc = subprocess.run([sys.executable, "-m", "cvae", "prior", "train", "--checkpoint",
                           str(run), "--resume", "--threads", "1", "--json"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prior_epoch"] for r in records[:-1]] == list(
        range(len(meta["epoch_losses"]) + 1, epochs + 1))
    assert records[-1]["epochs"] == epochs
    resumed, _, _ = load_checkpoint(run / "prior.cvae", expected_kind="prior")
    assert resumed["complete"] is True and len(resumed["epoch_losses"]) == epochs
    assert resumed["epoch_losses"][:len(meta["epoch_losses"])] == meta["epoch_losses"]

    straight = copy_run(world["bare"], tmp_path / "straight", sentinels=False)
    assert cli.main(["prior", "train", "--checkpoint", str(straight), *settings, "--quiet"]) == 0
    assert (run / "prior.cvae").read_bytes() == (straight / "prior.cvae").read_bytes(), \
        "the interrupted and resumed prior differs from the one trained in one go"


def test_eval_scores_both_priors(capsys, world, tmp_path, monkeypatch):
    run = copy_run(world["a"], tmp_path / "run", sentinels=False)
    code, out, err = run_cli(capsys, *evaluate(world, run, "--classifier", SHIPPED, "--json"))
    assert code == 0, err
    both = json.loads(out)
    # The file as printed, but with no machine paths: the checkpoint beside it, the classifier
    # named (the shipped one), no path of its own.
    assert json.loads((run / "eval.json").read_text()) == {
        **{k: v for k, v in both.items() if k != "eval_json"}, "checkpoint": "last.cvae",
        "classifier": "shipped"}
    assert list(both["by_prior"]) == ["flow", "gaussian"]
    flow, gauss = both["by_prior"]["flow"], both["by_prior"]["gaussian"]
    for entry in (flow, gauss):
        assert 0 <= entry["cond_accuracy"] <= 1 and entry["fid"] >= 0 and entry["diversity"] > 0
        assert set(entry["cond_accuracy_per_digit"]) == {str(d) for d in range(10)}
    assert flow["prior"] == "flow"
    assert (flow["steps"], flow["method"], flow["guidance"]) == (
        P.DEFAULT_STEPS, P.DEFAULT_METHOD, P.DEFAULT_GUIDANCE)
    assert os.path.samefile(run / flow["prior_file"], run / "prior.cvae")
    assert gauss["prior"] == "gaussian" and "steps" not in gauss
    assert both["prior"] == "flow" and both["prior_settings"]["prior"] == "flow"
    assert both["cond_accuracy"] == flow["cond_accuracy"] and both["fid"] == flow["fid"]
    assert both["diversity_test"] > 0 and len(both["diversity_test_per_digit"]) == 10

    # --prior gaussian: the same N(0, I) figures alone; --prior flow: the flow's alone.
    code, out, err = run_cli(capsys, *evaluate(world, run, "--classifier", SHIPPED, "--json",
                                               "--prior", "gaussian"))
    assert code == 0, err
    alone = json.loads(out)
    assert list(alone["by_prior"]) == ["gaussian"] and alone["prior"] == "gaussian"
    assert alone["by_prior"]["gaussian"] == gauss
    assert alone["neg_elbo"] == both["neg_elbo"]
    code, out, err = run_cli(capsys, *evaluate(world, run, "--classifier", SHIPPED, "--json",
                                               "--prior", "flow", "--steps", "3",
                                               "--method", "heun", "--guidance", "0"))
    assert code == 0, err
    only_flow = json.loads(out)["by_prior"]
    assert list(only_flow) == ["flow"]
    assert (only_flow["flow"]["steps"], only_flow["flow"]["method"],
            only_flow["flow"]["guidance"]) == (3, "heun", 0.0)
    assert only_flow["flow"]["cond_accuracy"] != flow["cond_accuracy"] or \
        only_flow["flow"]["fid"] != flow["fid"]

    # The table names both priors.
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the metric names on a narrow console
    code, out, err = run_cli(capsys, *evaluate(world, run, "--classifier", SHIPPED))
    assert code == 0, err
    assert "conditional accuracy (flow" in out and "conditional accuracy (gaussian" in out

    # Without a prior, eval scores N(0, I) only.
    bare = copy_run(world["bare"], tmp_path / "bare", sentinels=False)
    code, out, err = run_cli(capsys, *evaluate(world, bare, "--classifier", SHIPPED, "--json"))
    assert code == 0, err
    assert list(json.loads(out)["by_prior"]) == ["gaussian"]
