"""`--variant conv` through every command: train (and its resume checks), generate, eval,
info, bench, sweep (the variant axis), report and export, on tiny IDX files. The kernels'
numerics are tests/test_conv.py's; here each command must take the conv architecture
wherever it takes the MLP's, and refuse what does not fit it with a one-line error."""

import json

import numpy as np
import pytest

from cvae.checkpoint import load_checkpoint
from cvae.images import read_pgm
from cvae.model import VARIANTS

from .conftest import assert_one_line_error, run_cli, write_mnist_dir

pytestmark = pytest.mark.usefixtures("no_real_data")

# Small and deliberately not multiples of 16: a conv run of two epochs takes a second.
CONV = ["--variant", "conv", "--channels", "3,5", "--hidden", "24", "--latent", "4"]
RUN_ARGS = [*CONV, "--batch", "16", "--threads", "1", "--epochs", "2", "--seed", "3"]


def conv_params(c1, c2, hidden, latent, x=784, n_cls=10):
    """The issue's architecture, counted by hand: conv 1->c1, conv c1->c2, fc, fc -> 2L;
    fc, fc -> c2*7*7, transposed convs c2->c1 and c1->1 (4x4 kernels; a bias per output
    channel)."""
    flat = c2 * 49
    return ((16 * c1 + c1) + (16 * c1 * c2 + c2) + ((flat + n_cls) * hidden + hidden)
            + (hidden * 2 * latent + 2 * latent) + ((latent + n_cls) * hidden + hidden)
            + (hidden * flat + flat) + (16 * c2 * c1 + c1) + (16 * c1 + 1))


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    """A conv run of two epochs on tiny data, with its flow prior (the default)."""
    root = tmp_path_factory.mktemp("conv-cli")
    data = write_mnist_dir(root / "mnist")
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CVAE_DATA", raising=False)
        mp.setenv("CVAE_CACHE", str(root / "cache"))
        from cvae import cli
        code = cli.main(["train", *RUN_ARGS, "--data", str(data), "--out", str(run), "--quiet"])
    assert code == 0
    return {"root": root, "data": data, "run": run}


def test_info_counts_the_issues_architecture(capsys):
    code, out, err = run_cli(capsys, "info", *CONV, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["arch"] == {"type": "conv", "channels": [3, 5], "hidden": 24, "latent": 4,
                            "act": "elu"}
    assert info["n_params"] == conv_params(3, 5, 24, 4)
    code, out, err = run_cli(capsys, "info", "--variant", "conv", "--json")
    assert code == 0, err
    v = VARIANTS["conv"]
    assert json.loads(out)["n_params"] == conv_params(*v["channels"], v["hidden"], v["latent"])


def test_a_conv_run_trains_and_records_its_architecture(conv_run):
    run = conv_run["run"]
    meta, sections, _ = load_checkpoint(run / "last.cvae", expected_kind="cvae")
    assert meta["arch"]["type"] == "conv" and meta["arch"]["channels"] == [3, 5]
    assert meta["epoch"] == 2 and all(np.isfinite(a).all() for a in sections.values())
    config = json.loads((run / "config.json").read_text())
    assert config["variant"] == "conv" and config["arch"] == meta["arch"]
    assert config["n_params"] == conv_params(3, 5, 24, 4)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["test_neg_elbo"]) for m in metrics)
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    # The flow prior, trained by default, and both sheets.
    prior, _, _ = load_checkpoint(run / "prior.cvae", expected_kind="prior")
    assert prior["complete"]
    for sheet in ("samples.pgm", "samples-flow.pgm", "reconstructions.pgm"):
        assert read_pgm(run / sheet).shape[0] > 0


def test_generate_eval_report_and_export_take_a_conv_run(capsys, conv_run, tmp_path):
    run, data = conv_run["run"], conv_run["data"]
    out = tmp_path / "gen.pgm"
    code, _, err = run_cli(capsys, "generate", "--checkpoint", run, "--out", out,
                           "--per-digit", "3", "--threads", "1")
    assert code == 0, err
    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert sorted(c["label"] for c in cells if c["label"] is not None) == \
        sorted(list(range(10)) * 3)
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", data, "--k", "3",
                                "--samples", "20", "--threads", "1", "--json")
    assert code == 0, err
    evaluation = json.loads(stdout)
    assert np.isfinite(evaluation["neg_elbo"]) and set(evaluation["by_prior"]) >= {"flow"}
    exported = tmp_path / "model.cvae"
    code, _, err = run_cli(capsys, "export", run, "--out", exported)
    assert code == 0, err
    for source, name in ((run, "run.pgm"), (exported, "exported.pgm")):
        code, _, err = run_cli(capsys, "generate", "--checkpoint", source, "--out",
                               tmp_path / name, "--per-digit", "3", "--threads", "1",
                               "--prior", "gaussian")
        assert code == 0, err
    assert (tmp_path / "run.pgm").read_bytes() == (tmp_path / "exported.pgm").read_bytes()
    code, _, err = run_cli(capsys, "report", run, "--data", data)
    assert code == 0, err
    assert "conv 3-5-24-4 elu" in (run / "report.html").read_text()


def test_resume_keeps_the_conv_architecture(capsys, conv_run):
    run = conv_run["run"]
    for argv, fragment in ((["--channels", "4,5"], "architecture"),
                           (["--hidden", "32"], "architecture"),
                           (["--variant", "full"], "architecture")):
        code, _, err = run_cli(capsys, "train", "--resume", run, *argv)
        assert_one_line_error(code, err, fragment)
    code, out, err = run_cli(capsys, "train", "--resume", run, *CONV)
    assert code == 0 and "nothing to do" in out, err


@pytest.mark.parametrize("argv, fragment", [
    (["--variant", "full", "--channels", "3,5"], "--channels"),
    (["--variant", "conv", "--hidden", "24,12"], "one hidden size"),
    (["--variant", "mini", "--hidden", "24"], "two hidden sizes"),
    (["--variant", "conv", "--channels", "3"], "--channels"),
    (["--variant", "conv", "--channels", "0,5"], "--channels"),
])
def test_sizes_that_do_not_fit_the_variant_are_one_line_errors(capsys, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, "train", *argv, "--out", tmp_path / "run",
                           "--data", tmp_path / "no-data")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_bench_runs_the_conv_variant(capsys, data_dir):
    code, out, err = run_cli(capsys, "bench", "--variant", "conv", "--threads", "1", "--steps",
                             "2", "--warmup", "1", "--batch", "16", "--data", data_dir, "--json")
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["variant"] == "conv" and row["img_per_s"] > 0


def test_the_sweeps_variant_axis_trains_both_models(capsys, tmp_path, data_dir):
    out = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "sweep", "--variant", "mini,conv", "--latent", "4",
                           "--epochs", "1", "--batch", "16", "--threads", "1", "--k", "2",
                           "--samples", "5", "--data", data_dir, "--out", out, "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in rows) == ["MLP", "conv 32×64"]
    names = sorted(r["name"] for r in rows)
    assert names == ["conv-c32x64-latent4-h512-elu-progressive",
                     "latent4-h256x128-elu-progressive"]
    conv_config = json.loads((out / names[0] / "config.json").read_text())
    assert conv_config["variant"] == "conv" and conv_config["digits"] == list(range(10))
    assert "| model |" in (out / "sweep.md").read_text()  # the models differ: a column
    # --commands gives jobs that rebuild each run as it is.
    code, stdout, _ = run_cli(capsys, "sweep", "--variant", "mini,conv", "--latent", "4",
                              "--epochs", "1", "--out", out, "--commands")
    assert code == 0
    conv_line = next(line for line in stdout.splitlines() if "conv-c32x64" in line)
    assert "--variant conv --channels 32,64 --hidden 512" in conv_line
