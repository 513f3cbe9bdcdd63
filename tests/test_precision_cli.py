"""--precision through the commands: recorded in the run, kept by --resume, bit-identical for
any --threads; auto says what it chose; bench gives the Karp–Flatt serial fraction and the
scaling picture."""

import json

import numpy as np
import pytest

from cvae import bench
from cvae.checkpoint import load_checkpoint
from cvae.images import read_pgm
from cvae.kernels import resolve_precision

from .conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("no_real_data")

TINY = ["--hidden", "32,16", "--latent", "4", "--batch", "16", "--seed", "3", "--no-images",
        "--quiet"]


def train(capsys, data_dir, run, *more):
    return run_cli(capsys, "train", *TINY, "--data", data_dir, "--out", run, *more)


def test_bf16_is_recorded_kept_by_resume_and_the_same_for_any_threads(capsys, tmp_path, data_dir):
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
    assert train(capsys, data_dir, one, "--epochs", "2", "--precision", "bf16",
                 "--threads", "1")[0] == 0
    assert train(capsys, data_dir, two, "--epochs", "2", "--precision", "bf16",
                 "--threads", "2")[0] == 0
    assert (one / "last.cvae").read_bytes() == (two / "last.cvae").read_bytes()
    meta, _, _ = load_checkpoint(one / "last.cvae")
    assert meta["precision"] == "bf16"
    assert json.loads((one / "config.json").read_text())["precision"] == "bf16"
    # --resume keeps the run's precision, and refuses another
    assert train(capsys, data_dir, split, "--epochs", "2", "--precision", "bf16",
                 "--stop-after-epochs", "1")[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", split, "--precision", "fp32", "--quiet")
    assert_one_line_error(code, err, "--precision 'fp32' (the run has 'bf16')")
    assert run_cli(capsys, "train", "--resume", split, "--quiet", "--no-images")[0] == 0
    assert (split / "last.cvae").read_bytes() == (one / "last.cvae").read_bytes()
    # fp32 differs from bf16: the option really changes the computation
    assert train(capsys, data_dir, tmp_path / "fp32", "--epochs", "2", "--threads", "1",
                 "--precision", "fp32")[0] == 0
    fp32 = load_checkpoint(tmp_path / "fp32" / "last.cvae")
    assert fp32[0]["precision"] == "fp32"
    assert not np.array_equal(fp32[1]["param.dec3.W"], load_checkpoint(one / "last.cvae")[1]
                              ["param.dec3.W"])


def test_auto_says_what_it_chose(capsys, tmp_path, data_dir):
    code, out, err = train(capsys, data_dir, tmp_path / "run", "--epochs", "1", "--precision",
                           "auto")
    assert code == 0, err
    chosen, why = resolve_precision("auto")
    meta, _, _ = load_checkpoint(tmp_path / "run" / "last.cvae")
    assert meta["precision"] == chosen
    # --quiet prints nothing; without it the choice is said
    code, out, err = run_cli(capsys, "train", "--hidden", "32,16", "--latent", "4", "--batch",
                             "16", "--no-images", "--json", "--epochs", "1", "--data", data_dir,
                             "--out", tmp_path / "said", "--precision", "auto")
    assert code == 0, err
    assert f"precision auto: {chosen} ({why})" in err


def test_generate_and_eval_take_a_precision(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    assert train(capsys, data_dir, run, "--epochs", "1")[0] == 0
    sheets = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.pgm"
        code, text, err = run_cli(capsys, "generate", "--checkpoint", run, "--out", out,
                                  "--precision", precision, "--threads", "1")
        assert code == 0 and f", {precision}," in text, err
        assert json.loads(out.with_suffix(".json").read_text())["extra"]["precision"] == precision
        sheets[precision] = read_pgm(out).astype(int)
    # the same digits, within bf16's rounding of the decoder's inputs
    assert 0 < np.abs(sheets["fp32"] - sheets["bf16"]).max() < 64
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", data_dir, "--k", "2",
                             "--precision", "bf16", "--json")
    assert code == 0, err
    assert json.loads(out)["precision"] == "bf16"


def test_karp_flatt():
    assert bench.karp_flatt(None, 2) is None and bench.karp_flatt(1.0, 1) is None
    assert bench.karp_flatt(2.0, 2) == 0.0          # ideal: nothing serial
    assert bench.karp_flatt(1.0, 2) == 1.0          # no speed-up: all serial
    assert bench.karp_flatt(1.6, 2) == pytest.approx(0.25)


def test_bench_json_and_the_scaling_picture(capsys, tmp_path, data_dir):
    plot = tmp_path / "scaling.png"
    code, out, err = run_cli(capsys, "bench", "--variant", "mini", "--batch", "16", "--threads", "1,2",
                             "--steps", "3", "--warmup", "1", "--repeat", "1", "--data",
                             data_dir, "--json", "--plot", plot, "--precision", "bf16")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["threads"] for r in rows] == [1, 2]
    assert all(r["precision"] == "bf16" for r in rows)
    assert rows[0]["serial_fraction"] is None
    # The JSON rounds the speed-up to 3 decimals, which on a loaded machine (a speed-up far
    # below 1) moves 2/S - 1 by more than any fixed tolerance: recompute S from the img/s.
    speedup = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    assert rows[1]["speedup"] == pytest.approx(speedup, abs=1e-3)
    assert rows[1]["serial_fraction"] == pytest.approx(bench.karp_flatt(speedup, 2), rel=1e-2,
                                                      abs=1e-3)
    assert plot.read_bytes().startswith(b"\x89PNG")
    code, _, err = run_cli(capsys, "bench", "--data", data_dir, "--plot", tmp_path / "x.jpg")
    assert_one_line_error(code, err, ".png")
