"""cvae sweep: every combination trained and evaluated, one table, restarts that skip finished
runs and resume partial ones, signals, --collect over runs made by separate jobs, bad input.

Tiny models (hidden 32x16, latent 4/8) on tiny synthetic IDX files, a couple of epochs."""

import functools
import json
import os
import signal
import subprocess
import sys

import pytest

from cvae import cli
from cvae import prior as P
from cvae import sweep as S
from cvae import train as T
from cvae.checkpoint import load_checkpoint
from cvae import rundir as R
from cvae import workflows as W
from cvae import train_prior as TP
from cvae import train_classifier as TC
from .conftest import REAL, REPO, assert_one_line_error, run_cli, write_mnist_dir

pytestmark = pytest.mark.usefixtures("no_real_data")

NAMES = ["latent4-h32x16-elu-progressive", "latent8-h32x16-elu-progressive"]
SHARED = ["--hidden", "32x16", "--epochs", "2", "--batch", "16", "--threads", "1", "--k", "3"]
GRID = ["--latent", "4,8"]


def sweep(capsys, data_dir, out, *extra, grid=GRID):
    return run_cli(capsys, "sweep", *grid, *SHARED, "--data", data_dir, "--out", out, *extra)


def stamps(directory):
    """(inode, mtime_ns, size) of every checkpoint and eval.json under directory."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".cvae") or name == "eval.json":
                st = os.stat(os.path.join(root, name))
                found[os.path.relpath(os.path.join(root, name), directory)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def rows(directory):
    return [json.loads(line) for line in (directory / "sweep.jsonl").read_text().splitlines()]


def cvae_on_path(tmp_path):
    """An environment whose PATH has a `cvae` that runs this checkout (for job lines)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "cvae").write_text(f"#!/bin/sh\nexec {sys.executable} -m cvae \"$@\"\n")
    (shim / "cvae").chmod(0o755)
    return dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def assert_finished(run):
    meta, _, _ = load_checkpoint(run / "last.cvae")
    assert meta["epoch"] == meta["epochs"] == 2
    for name in ("eval.json", "samples.pgm", "samples.json", "config.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    ev = json.loads((run / "eval.json").read_text())
    assert ev["k"] == 3 and os.path.basename(ev["checkpoint"]) == "last.cvae"


# ---------------------------------------------------------------- the sweep and its table


def test_two_runs_then_a_rerun_skips_both(capsys, tmp_path, data_dir):
    out = tmp_path / "sw"
    code, stdout, err = sweep(capsys, data_dir, out, "--quiet")
    assert code == 0, err
    assert stdout == "" and err == ""
    for name in NAMES:
        assert_finished(out / name)
    table = rows(out)
    assert [r["name"] for r in table] == NAMES
    for r, latent in zip(table, (4, 8)):
        assert (r["latent"], r["hidden"], r["act"], r["schedule"], r["epochs"]) == (latent, [32, 16], "elu", "progressive", 2)
        assert (r["batch"], r["lr"], r["seed"], r["digits"]) == (16, 0.001, 0, list(range(10)))
        ev = json.loads((out / r["name"] / "eval.json").read_text())
        for key in ("neg_elbo", "rec", "kl", "iwae_nll", "k", "ssim"):
            assert r[key] == ev[key]
        for key in ("cond_accuracy", "fid", "fid_test_floor", "temperature"):
            assert key in r and r[key] == ev.get(key)
        assert r["run_dir"] == r["name"] and r["samples"] == f"{r['name']}/samples.pgm"
        assert r["eval_seed"] == 0
    md = (out / "sweep.md").read_text()
    body = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(body) == 2
    best = min(table, key=lambda r: r["neg_elbo"])
    for line, r in zip(body, table):
        assert f"`{r['name']}`" in line and f"[samples.pgm]({r['name']}/samples.pgm)" in line
        assert (f"**{r['neg_elbo']:.2f}**" in line) == (r is best)
    assert "- **−ELBO**:" in md and "- **IWAE NLL**:" in md and "- **samples**:" in md
    if table[0]["fid"] is None:
        assert "—" in body[0]

    before = stamps(out)
    table_before = (out / "sweep.jsonl").read_text()
    code, stdout, err = sweep(capsys, data_dir, out)
    assert code == 0, err
    assert stdout.count("skipped (finished)") == 2 and "training" not in stdout
    assert stamps(out) == before
    assert (out / "sweep.jsonl").read_text() == table_before


def test_json_prints_one_object_per_run(capsys, tmp_path, data_dir):
    out = tmp_path / "sw"
    code, stdout, err = sweep(capsys, data_dir, out, "--json")
    assert code == 0, err
    objects = [json.loads(line) for line in stdout.splitlines()]
    assert [(o["name"], o["status"]) for o in objects] == [(n, "trained") for n in NAMES]
    assert "training" in err  # progress lines go to stderr
    assert [{k: v for k, v in o.items() if k != "status"} for o in objects] == rows(out)
    code, stdout, _ = sweep(capsys, data_dir, out, "--json")
    assert [json.loads(line)["status"] for line in stdout.splitlines()] == ["skipped", "skipped"]


def test_a_partial_run_is_resumed_exactly(capsys, tmp_path, data_dir):
    out = tmp_path / "sw"
    code, _, err = run_cli(capsys, "train", "--hidden", "32,16", "--latent", "4", "--epochs", "2",
                           "--batch", "16", "--threads", "1", "--data", data_dir, "--out",
                           out / NAMES[0], "--stop-after-epochs", "1", "--quiet")
    assert code == 0, err
    meta, _, _ = load_checkpoint(out / NAMES[0] / "last.cvae")
    assert meta["epoch"] == 1 and not (out / NAMES[0] / "eval.json").exists()

    code, stdout, err = sweep(capsys, data_dir, out)
    assert code == 0, err
    assert f"{NAMES[0]}: resuming at epoch 2 of 2" in stdout
    assert f"{NAMES[1]}: training (2 epochs)" in stdout
    for name in NAMES:
        assert_finished(out / name)
    assert len(R.read_metrics(out / NAMES[0])) == 2

    straight = tmp_path / "straight"
    code, _, err = sweep(capsys, data_dir, straight, "--quiet")
    assert code == 0, err
    for name in NAMES:
        assert (out / name / "last.cvae").read_bytes() == (straight / name / "last.cvae").read_bytes()


def test_a_stale_or_missing_evaluation_is_redone_without_training(capsys, tmp_path, data_dir):
    out = tmp_path / "sw"
    assert sweep(capsys, data_dir, out, "--quiet")[0] == 0
    checkpoints = {k: v for k, v in stamps(out).items() if k.endswith(".cvae")}
    (out / NAMES[1] / "eval.json").unlink()
    code, stdout, err = run_cli(capsys, "sweep", *GRID, *SHARED[:-1], "4", "--data", data_dir,
                                "--out", out)
    assert code == 0, err
    assert stdout.count("evaluating") == 2 and "training" not in stdout and "skipped" not in stdout
    assert {k: v for k, v in stamps(out).items() if k.endswith(".cvae")} == checkpoints
    assert [r["k"] for r in rows(out)] == [4, 4]


def test_a_run_stopped_before_its_first_checkpoint_starts_again(capsys, tmp_path, data_dir):
    out = tmp_path / "sw"
    assert sweep(capsys, data_dir, out, "--quiet")[0] == 0
    run = out / NAMES[0]
    for path in run.iterdir():
        if path.name not in ("config.json", "metrics.jsonl"):
            path.unlink()
    code, stdout, err = sweep(capsys, data_dir, out)
    assert code == 0, err
    assert f"{NAMES[0]}: training" in stdout and f"{NAMES[1]}: skipped (finished)" in stdout
    assert_finished(run)


@pytest.mark.parametrize("signum, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_sweep_and_a_rerun_finishes_it(capsys, tmp_path, data_dir, monkeypatch,
                                                          signum, expected):
    out = tmp_path / "sw"
    original = T.Trainer.run

    def run_with_a_signal(self, *args, **kwargs):
        def send(trainer, step):
            if step == 3:
                os.kill(os.getpid(), signum)

        self.after_step = send
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T.Trainer, "run", run_with_a_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code, _, err = sweep(capsys, data_dir, out, "--quiet")
    assert code == expected, err
    assert "sweep stopped" in err and "Traceback" not in err
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    meta, _, _ = load_checkpoint(out / NAMES[0] / "last.cvae")
    assert meta["epoch"] == 0 and meta["step"] in (3, 4)
    assert not (out / NAMES[1]).exists() and not (out / "sweep.md").exists()

    monkeypatch.setattr(T.Trainer, "run", original)
    code, stdout, err = sweep(capsys, data_dir, out)
    assert code == 0, err
    assert f"{NAMES[0]}: resuming at epoch 1 of 2" in stdout
    for name in NAMES:
        assert_finished(out / name)
    assert len(rows(out)) == 2


def test_a_signal_during_evaluation_stops_at_once(capsys, tmp_path, data_dir, monkeypatch):
    from cvae import evaluate

    out = tmp_path / "sw"
    original = W.run_eval

    @functools.wraps(original)
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the sweep")

    monkeypatch.setattr(W, "run_eval", killed)
    code, _, err = sweep(capsys, data_dir, out, "--quiet")
    assert code == 143, err
    assert "SIGTERM" in err and "sweep stopped" in err and "Traceback" not in err
    assert not (out / NAMES[0] / "eval.json").exists() and not (out / NAMES[1]).exists()
    monkeypatch.setattr(W, "run_eval", original)
    code, stdout, err = sweep(capsys, data_dir, out)
    assert code == 0, err
    assert f"{NAMES[0]}: trained; no eval.json: evaluating" in stdout
    for name in NAMES:
        assert_finished(out / name)


# ---------------------------------------------------------------- --collect


def separate_jobs(capsys, data_dir, directory, name, latent, *extra):
    run = directory / name
    code, _, err = run_cli(capsys, "train", "--hidden", "32,16", "--latent", latent, "--epochs", "2",
                           "--batch", "16", "--threads", "1", "--data", data_dir, "--out", run,
                           "--quiet", "--prior", "gaussian", *extra)
    assert code == 0, err
    if "--stop-after-epochs" in extra:
        return
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", data_dir, "--k", "3",
                                "--threads", "1", "--json")
    assert code == 0, err
    json.loads(stdout)


def test_collect_of_separate_jobs_gives_the_sweeps_table(capsys, tmp_path, data_dir):
    swept = tmp_path / "a" / "sweep"
    assert sweep(capsys, data_dir, swept, "--quiet")[0] == 0

    jobs = tmp_path / "b" / "sweep"
    for name, latent in zip(NAMES, ("4", "8")):
        separate_jobs(capsys, data_dir, jobs, name, latent)
    separate_jobs(capsys, data_dir, jobs, "unfinished", "8", "--stop-after-epochs", "1")
    (jobs / "notes").mkdir()  # not a run: ignored
    code, stdout, err = run_cli(capsys, "sweep", "--collect", jobs)
    assert code == 0, err
    assert err.strip().splitlines() == [
        f"cvae: {jobs / 'unfinished'}: unfinished (training not complete (epoch 1 of 2)): not in the table"]
    assert "2 finished run(s)" in stdout
    assert (jobs / "sweep.jsonl").read_text() == (swept / "sweep.jsonl").read_text()
    assert (jobs / "sweep.md").read_text() == (swept / "sweep.md").read_text()

    # --collect on the sweep's own directory rebuilds the same table
    before = (swept / "sweep.md").read_text()
    (swept / "sweep.md").unlink()
    code, stdout, err = run_cli(capsys, "sweep", "--collect", swept, "--json")
    assert code == 0 and err == ""
    assert [json.loads(line) for line in stdout.splitlines()] == rows(swept)
    assert (swept / "sweep.md").read_text() == before


def test_commands_are_jobs_that_collect_tabulates(capsys, tmp_path, data_dir):
    out = tmp_path / "jobs"
    code, stdout, err = run_cli(capsys, "sweep", "--latent", "4", *SHARED, "--data", data_dir,
                                "--out", out, "--commands")
    assert code == 0, err
    (line,) = stdout.splitlines()
    assert "cvae train --out" in line and "cvae eval --checkpoint" in line and "--k=3" in line
    assert not out.exists()
    env = cvae_on_path(tmp_path)
    for _ in range(2):  # the second time the line resumes (here: finds the run complete)
        proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1])["k"] == 3
    code, _, err = run_cli(capsys, "sweep", "--collect", out)
    assert code == 0, err
    assert [r["name"] for r in rows(out)] == [NAMES[0]]
    code, stdout, err = run_cli(capsys, "sweep", "--latent", "4", *SHARED, "--data", data_dir, "--out", out)
    assert code == 0, err
    assert "skipped (finished)" in stdout


# ---------------------------------------------------------------- the table itself


def test_markdown_marks_missing_metrics_and_the_best_elbo():
    base = {"model": "MLP", "latent": 4, "hidden": [32, 16], "act": "elu", "schedule": "progressive", "epochs": 2,
            "digits": [0, 1], "batch": 16, "lr": 0.001, "seed": 0, "k": 3, "rec": 1.0, "kl": 2.0,
            "iwae_nll": 2.5, "ssim": 0.5, "eval_seed": 0}
    rows_ = [{**base, "name": "a", "neg_elbo": 3.0, "fid": None, "samples": "a/samples.pgm"},
             {**base, "name": "b", "latent": 8, "neg_elbo": 2.0, "fid": 12.345, "samples": None,
              "seed": 1}]
    md = S.render_markdown(rows_, "t")
    a, b = [line for line in md.splitlines() if line.startswith("| `")]
    assert "**2.00**" in b and "**" not in a
    assert "12.35" in b and a.count("—") >= 4  # fid, cond. acc., FID floor, T
    assert b.rstrip().endswith("| — |")  # no samples sheet
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert "| seed |" in header and "| batch |" not in header  # only the varying settings
    assert "Common to every run: model MLP, digits 0-1, batch 16, lr 0.001, eval seed 0." in md


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, fragment", [
    (["--latent", ""], "empty item"),
    (["--latent", "4,,8"], "empty item"),
    (["--latent", "4,"], "empty item"),
    (["--latent", "4,4"], "twice"),
    (["--latent", "0"], "positive integer"),
    (["--latent", "four"], "positive integer"),
    (["--hidden", "32;16"], "H1xH2"),
    (["--hidden", "32x16,32X16"], "twice"),
    (["--hidden", "32x0"], "H1xH2"),
    (["--act", "tanh"], "activation"),
    (["--act", "elu,elu"], "twice"),
    (["--schedule", "cosine"], "schedule"),
    (["--epochs", "0"], "--epochs"),
    (["--json", "--quiet"], "not allowed"),
    (["--prior", "normal"], "a prior"),
    (["--prior", "flow,flow"], "twice"),
    (["--prior-epochs", "0"], "--prior-epochs"),
])
def test_bad_lists_are_one_line_errors(capsys, tmp_path, argv, fragment):
    out = tmp_path / "sw"
    code, _, err = run_cli(capsys, "sweep", *argv, "--out", out)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_bad_directories_and_mixed_options(capsys, tmp_path, data_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["sweep", "--latent", "4"], "--out"),
        (["sweep", "--latent", "4", "--out", a_file], "not a directory"),
        (["sweep", "--latent", "4", "--out", a_file / "sub"], "cannot create --out"),
        (["sweep", "--collect", tmp_path / "missing"], "no such directory"),
        (["sweep", "--collect", a_file], "not a directory"),
        (["sweep", "--collect", empty], "no finished runs"),
        (["sweep", "--collect", empty, "--latent", "4,8"], "--latent"),
        (["sweep", "--collect", empty, "--epochs", "3"], "--epochs"),
        (["sweep", "--collect", empty, "--out", tmp_path / "x"], "--out"),
        (["sweep", "--collect", empty, "--prior", "flow"], "--prior"),
        (["sweep", "--latent", "4", "--prior-epochs", "3", "--out", tmp_path / "x"], "add flow to --prior"),
        (["sweep", "--latent", "4", "--data", tmp_path / "nowhere", "--out", tmp_path / "x"], "nowhere"),
    ]
    for argv, fragment in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, fragment)
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "mnist"]
    assert os.listdir(empty) == []


def test_a_run_directory_with_other_settings_is_refused_before_anything_runs(capsys, tmp_path, data_dir):
    out = tmp_path / "sw"
    code, _, err = run_cli(capsys, "train", "--hidden", "32,16", "--latent", "8", "--epochs", "1",
                           "--batch", "16", "--threads", "1", "--data", data_dir, "--out",
                           out / NAMES[1], "--quiet", "--no-images")
    assert code == 0, err
    before = stamps(out)
    code, _, err = sweep(capsys, data_dir, out)
    assert_one_line_error(code, err, NAMES[1], "epochs 1 (this sweep: 2)")
    assert sorted(os.listdir(out)) == [NAMES[1]] and stamps(out) == before


def test_a_classifier_judges_every_run_and_another_one_means_a_new_evaluation(capsys, tmp_path,
                                                                              data_dir):
    """With --classifier the table gets accuracy and FID; a rerun with the default classifier
    (none for this data) re-evaluates instead of skipping, and trains nothing."""
    from cvae import classifier as C
    from cvae.data import Dataset

    judge = TC.train_classifier(Dataset.load(data_dir, "train"), epochs=1, batch=32, seed=0,
                               arch=C.ClassifierArch(h1=32, h2=16))
    C.save_classifier(tmp_path / "judge.cvae", judge, {"test_accuracy": 0.5})
    out = tmp_path / "sw"
    grid = ["--latent", "4"]
    code, _, err = sweep(capsys, data_dir, out, "--quiet", "--samples", "20", "--classifier",
                         tmp_path / "judge.cvae", grid=grid)
    assert code == 0, err
    (row,) = rows(out)
    assert 0 <= row["cond_accuracy"] <= 1 and row["fid"] >= 0 and row["fid_test_floor"] >= 0
    assert row["temperature"] == 1.0
    checkpoints = {k: v for k, v in stamps(out).items() if k.endswith(".cvae")}
    code, stdout, err = sweep(capsys, data_dir, out, "--samples", "20", grid=grid)
    assert code == 0, err
    assert "skipped" not in stdout and "evaluated" in stdout, stdout
    assert {k: v for k, v in stamps(out).items() if k.endswith(".cvae")} == checkpoints
    (row,) = rows(out)
    assert row["cond_accuracy"] is None and row["fid"] is None


# ---------------------------------------------------------------- the prior axis

FLOW_NAMES = ["latent4-h32x16-elu-progressive", "latent8-h32x16-elu-progressive"]
FLOW_ARGS = ["--hidden", "32x16", "--digits", "0,1", "--epochs", "1", "--k", "2", "--samples", "20",
             "--threads", "1"]
PRIOR_EPOCHS = 3


@pytest.fixture(scope="module")
def flow_data(tmp_path_factory):
    """(data options, evaluation options): the real MNIST digits 0 and 1 (the mini variant,
    judged by the shipped classifier) when CVAE_DATA is set, else the tiny synthetic digits
    judged by a tiny classifier, so the table has its sample metrics either way."""
    if REAL:
        return ["--data", REAL, "--variant", "mini"], []
    from cvae import classifier as C
    from cvae.data import Dataset

    base = tmp_path_factory.mktemp("flowdata")
    data_dir = write_mnist_dir(base / "mnist")
    judge = TC.train_classifier(Dataset.load(data_dir, "train"), epochs=1, batch=32, seed=0,
                               arch=C.ClassifierArch(h1=32, h2=16))
    C.save_classifier(base / "judge.cvae", judge, {"test_accuracy": 0.5})
    return ["--data", data_dir], ["--classifier", base / "judge.cvae"]


def flow_sweep(capsys, flow_data, out, *extra, latent="4,8", priors="gaussian,flow",
               prior_epochs=PRIOR_EPOCHS):
    data, judge = flow_data
    epochs = ["--prior-epochs", prior_epochs] if "flow" in priors else []
    return run_cli(capsys, "sweep", "--latent", latent, *FLOW_ARGS, *data, *judge, "--prior",
                   priors, *epochs, "--out", out, *extra)


@pytest.fixture(scope="module")
def flow_done(tmp_path_factory, flow_data):
    """A finished two-run sweep with --prior gaussian,flow (made once; tests copy it to change it)."""
    out = tmp_path_factory.mktemp("flow") / "sw"
    code = cli.main([str(a) for a in ["sweep", "--latent", "4,8", *FLOW_ARGS, *flow_data[0],
                                      *flow_data[1], "--prior", "gaussian,flow", "--prior-epochs",
                                      PRIOR_EPOCHS, "--out", out, "--quiet"]])
    assert code == 0
    return out


def copy_sweep(src, dst):
    import shutil

    shutil.copytree(src, dst)  # copy2: the times too, so nothing turns stale
    return dst


def prior_meta(run):
    meta, _, _ = load_checkpoint(run / "prior.cvae")
    return meta


def test_the_prior_axis_gives_one_row_per_run_and_prior(flow_done):
    out = flow_done
    table = rows(out)
    assert [(r["name"], r["prior"]) for r in table] == [
        (FLOW_NAMES[0], "flow"), (FLOW_NAMES[0], "gaussian"),
        (FLOW_NAMES[1], "flow"), (FLOW_NAMES[1], "gaussian")]
    for name in FLOW_NAMES:
        run = out / name
        meta = prior_meta(run)
        assert meta["complete"] and meta["epochs"] == PRIOR_EPOCHS and meta["seed"] == 0
        assert meta["cvae_checkpoint"] == "last.cvae"
        for sheet in ("samples.pgm", "samples-flow.pgm", "samples-flow.json", "eval.json"):
            assert (run / sheet).is_file(), sheet
        ev = json.loads((run / "eval.json").read_text())
        assert set(ev["by_prior"]) == {"flow", "gaussian"}
        flow, gauss = [r for r in table if r["name"] == name]
        for r in (flow, gauss):
            judged = ev["by_prior"][r["prior"]]
            for key in ("cond_accuracy", "cond_accuracy_per_digit", "fid", "fid_test_floor",
                        "diversity", "diversity_per_digit"):
                assert r[key] == judged[key] and r[key] is not None, key
            assert 0 <= r["cond_accuracy"] <= 1 and r["fid"] >= 0 and r["diversity"] > 0
            for key in ("neg_elbo", "rec", "kl", "iwae_nll", "k", "ssim", "ssim_per_digit",
                        "diversity_test", "temperature"):
                assert r[key] == ev[key] and r[key] is not None, key
            assert r["k"] == 2 and r["eval_seed"] == 0
        assert flow["samples"] == f"{name}/samples-flow.pgm" and gauss["samples"] == f"{name}/samples.pgm"
        assert flow["prior_settings"] == {"epochs": PRIOR_EPOCHS, "steps": P.DEFAULT_STEPS,
                                          "method": P.DEFAULT_METHOD,
                                          "guidance": P.DEFAULT_GUIDANCE}
        assert gauss["prior_settings"] is None
        assert flow["fid"] != gauss["fid"]
    md = (out / "sweep.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert "| prior |" in header and "| diversity | test diversity |" in header
    body = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(body) == 4
    assert "| flow |" in body[0] and "[samples-flow.pgm]" in body[0]
    assert "| gaussian |" in body[1] and "[samples.pgm]" in body[1]
    assert "2 finished run(s), one row per run and prior (4 rows)" in md
    for column in ("prior", "diversity", "test diversity", "samples"):
        assert f"- **{column}**:" in md
    assert f"({PRIOR_EPOCHS} epochs, midpoint, 2 steps, guidance 2)" in md


def test_a_rerun_of_the_prior_sweep_skips_everything(capsys, tmp_path, flow_data, flow_done):
    out = copy_sweep(flow_done, tmp_path / "sw")
    before = stamps(out)
    table = (out / "sweep.jsonl").read_text()
    code, stdout, err = flow_sweep(capsys, flow_data, out)
    assert code == 0, err
    assert stdout.count("skipped (finished)") == 2 and "training" not in stdout and "prior:" not in stdout
    assert stamps(out) == before  # checkpoints, priors, evaluations
    assert (out / "sweep.jsonl").read_text() == table
    # Fewer priors: the same runs are finished, the table has their rows only.
    for priors in ("gaussian", "flow"):
        code, stdout, err = flow_sweep(capsys, flow_data, out, "--json", priors=priors)
        assert code == 0, err
        objects = [json.loads(line) for line in stdout.splitlines()]
        assert [(o["name"], o["prior"], o["status"]) for o in objects] == [
            (name, priors, "skipped") for name in FLOW_NAMES]
        assert [{k: v for k, v in o.items() if k != "status"} for o in objects] == rows(out)
        assert stamps(out) == before


def test_only_the_missing_part_of_a_flow_run_is_redone(capsys, tmp_path, flow_data, flow_done):
    out = copy_sweep(flow_done, tmp_path / "sw")
    table = rows(out)
    before = stamps(out)
    # run 0 lost its flow sheet; run 1's evaluation did not judge the flow prior
    (out / FLOW_NAMES[0] / "samples-flow.pgm").unlink()
    ev_path = out / FLOW_NAMES[1] / "eval.json"
    ev = json.loads(ev_path.read_text())
    del ev["by_prior"]["flow"]
    ev_path.write_text(json.dumps(ev))
    code, stdout, err = flow_sweep(capsys, flow_data, out)
    assert code == 0, err
    assert f"{FLOW_NAMES[0]}: trained; no samples-flow.pgm: writing its images" in stdout
    assert f"{FLOW_NAMES[1]}: trained; eval.json does not judge the flow prior: evaluating" in stdout
    assert "training" not in stdout and ": flow prior:" not in stdout
    after = stamps(out)
    assert after[f"{FLOW_NAMES[0]}/eval.json"] == before[f"{FLOW_NAMES[0]}/eval.json"]
    assert (out / FLOW_NAMES[0] / "samples-flow.pgm").read_bytes() == \
        (flow_done / FLOW_NAMES[0] / "samples-flow.pgm").read_bytes()
    assert {k: v for k, v in after.items() if k.endswith(".cvae")} == \
        {k: v for k, v in before.items() if k.endswith(".cvae")}
    assert rows(out) == table


def test_a_prior_of_another_checkpoint_is_replaced(capsys, tmp_path, flow_data, flow_done):
    out = copy_sweep(flow_done, tmp_path / "sw")
    run = out / FLOW_NAMES[0]
    (run / "prior.cvae").write_bytes((out / FLOW_NAMES[1] / "prior.cvae").read_bytes())
    code, stdout, err = flow_sweep(capsys, flow_data, out, "--json")
    assert code == 0, err
    assert "flow prior: training in place of its prior.cvae of another checkpoint" in err
    statuses = [(o["name"], o["status"]) for o in map(json.loads, stdout.splitlines())]
    assert statuses == [(FLOW_NAMES[0], "prior")] * 2 + [(FLOW_NAMES[1], "skipped")] * 2
    assert (run / "prior.cvae").read_bytes() == (flow_done / FLOW_NAMES[0] / "prior.cvae").read_bytes()
    assert rows(out) == rows(flow_done)


def test_a_flow_prior_with_other_settings_is_refused(capsys, tmp_path, flow_data, flow_done):
    out = copy_sweep(flow_done, tmp_path / "sw")
    before = stamps(out)
    code, _, err = flow_sweep(capsys, flow_data, out, prior_epochs=PRIOR_EPOCHS + 1)
    assert_one_line_error(code, err, "prior.cvae is a flow prior with other settings",
                          f"epochs {PRIOR_EPOCHS} (this sweep: {PRIOR_EPOCHS + 1})")
    assert stamps(out) == before


def test_a_signal_during_the_prior_saves_it_and_a_rerun_finishes_it(capsys, tmp_path, flow_data,
                                                                   flow_done, monkeypatch):
    out = tmp_path / "sw"
    original = TP.PriorTrainer.run
    sent = []

    def run_with_a_signal(self):
        first, inner = self.plan.step, self.on_progress

        def progress(step, *rest):
            if inner is not None:
                inner(step, *rest)
            if step == first + 1:
                os.kill(os.getpid(), sent[-1])

        self.on_progress = progress
        return original(self)

    monkeypatch.setattr(TP.PriorTrainer, "run", run_with_a_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    steps = []
    for signum, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        sent.append(signum)
        code, stdout, err = flow_sweep(capsys, flow_data, out, latent="4")
        assert code == expected, err
        assert "sweep stopped in run" in err and "Traceback" not in err
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        meta = prior_meta(out / FLOW_NAMES[0])  # saved when stopped
        assert not meta["complete"] and meta["step"] > (steps[-1] if steps else 0)
        steps.append(meta["step"])
        assert not (out / FLOW_NAMES[0] / "eval.json").exists() and not (out / "sweep.md").exists()
    assert f"{FLOW_NAMES[0]}: flow prior: resuming at step {steps[0]}" in stdout

    monkeypatch.setattr(TP.PriorTrainer, "run", original)
    code, stdout, err = flow_sweep(capsys, flow_data, out, latent="4")
    assert code == 0, err
    assert f"{FLOW_NAMES[0]}: trained; prior.cvae is partly trained (step {steps[1]})" in stdout
    assert "training (" not in stdout
    run = out / FLOW_NAMES[0]
    assert prior_meta(run)["complete"] and (run / "samples-flow.pgm").is_file()
    # stopped twice and resumed, the prior is the one trained straight through
    assert (run / "prior.cvae").read_bytes() == (flow_done / FLOW_NAMES[0] / "prior.cvae").read_bytes()
    assert rows(out) == rows(flow_done)[:2]


def test_commands_train_the_prior_and_collect_gives_the_same_table(capsys, tmp_path, flow_data,
                                                                 flow_done):
    out = copy_sweep(flow_done, tmp_path / "sw")
    code, stdout, err = flow_sweep(capsys, flow_data, out, "--commands")
    assert code == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, FLOW_NAMES):
        run = shlex_quote(str(out / name))
        train, prior, ev = line.index("cvae train"), line.index("cvae prior train"), line.index("cvae eval")
        assert train < prior < ev
        assert (f"if [ -e {run}/prior.cvae ]; then cvae prior train --checkpoint {run} --resume "
                "--threads 1") in line
        assert f"else cvae prior train --checkpoint {run} --epochs {PRIOR_EPOCHS} --threads 1" in line
        assert "--prior=both" in line
    code, stdout, err = flow_sweep(capsys, flow_data, out, "--commands", priors="gaussian")
    assert "prior train" not in stdout and "--prior=gaussian" in stdout

    # --collect over the sweep's directory: the same table
    (out / "sweep.jsonl").unlink()
    (out / "sweep.md").unlink()
    code, stdout, err = run_cli(capsys, "sweep", "--collect", out)
    assert code == 0, err
    assert "2 finished run(s) (4 rows: one per run and prior)" in stdout
    assert rows(out) == rows(flow_done)
    assert (out / "sweep.md").read_text() == (flow_done / "sweep.md").read_text()

    # a job line run again (its run finished: the training and the prior resume to nothing)
    env = cvae_on_path(tmp_path)
    env.pop("CVAE_DATA", None)
    prior_before = (out / FLOW_NAMES[0] / "prior.cvae").read_bytes()
    proc = subprocess.run(["bash", "-c", lines[0]], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout.splitlines()[-1])["by_prior"]) == {"flow", "gaussian"}
    assert (out / FLOW_NAMES[0] / "prior.cvae").read_bytes() == prior_before
    code, _, err = run_cli(capsys, "sweep", "--collect", out)
    assert code == 0, err
    assert rows(out) == rows(flow_done)


def shlex_quote(text):
    import shlex

    return shlex.quote(text)


def test_collect_reads_an_evaluation_from_before_the_flow_prior(tmp_path):
    """An eval.json without by_prior judged N(0, I): one gaussian row, its top-level metrics."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "arch": {"h1": 32, "h2": 16, "latent": 4, "act": "elu"}, "epochs": 1, "digits": [0, 1],
        "schedule": {"name": "progressive", "params": {}}, "batch": 16, "lr": 0.001, "seed": 0}))
    old = {"neg_elbo": 3.0, "rec": 2.0, "kl": 1.0, "iwae_nll": 2.9, "k": 2, "ssim": 0.5,
           "cond_accuracy": 0.9, "cond_accuracy_per_digit": {"0": 0.8, "1": 1.0}, "fid": 12.0,
           "fid_test_floor": 1.0, "temperature": 1.0, "seed": 0, "n_images": 10,
           "checkpoint": str(run / "last.cvae")}
    (run / "eval.json").write_text(json.dumps(old))
    (row,) = S.read_rows(tmp_path, run)
    assert row["prior"] == "gaussian" and row["prior_settings"] is None
    for key in ("cond_accuracy", "cond_accuracy_per_digit", "fid", "fid_test_floor", "neg_elbo"):
        assert row[key] == old[key]
    assert row["diversity"] is None and row["diversity_test"] is None
    (flow,) = S.read_rows(tmp_path, run, ["flow"])  # asked for: no figures of it
    assert flow["cond_accuracy"] is None and flow["neg_elbo"] == 3.0
    assert R.eval_problem(run, 1, priors=("gaussian",)) is None
    assert R.eval_problem(run, 1, priors=("gaussian", "flow")) == "eval.json does not judge the flow prior"
    # one without a classifier judged nothing: a flow evaluation stands for both
    assert R.judged_priors({"by_prior": {}, "prior": "flow"}) == ["flow", "gaussian"]
    assert R.judged_priors({"by_prior": {}, "prior": "gaussian"}) == ["gaussian"]
    assert R.judged_priors({"by_prior": {"gaussian": {}, "flow": {}}}) == ["flow", "gaussian"]
