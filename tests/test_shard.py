"""cvae generate --shard K/N | slurm, --format idx and cvae data merge, without Slurm: the
shards of a generation write, byte for byte, what one unsharded run writes; the IDX set is
what MNIST loaders (and cvae train) read; memory stays one block. The same through real
Slurm job arrays: tests/test_slurm.py."""

import json
import os
import re
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

from cvae import data as D
from cvae import sheets
from cvae.errors import CvaeError
from cvae.model import Arch, Model, model_from_checkpoint
from cvae.shard import Shard, parse_shard

from .conftest import (assert_one_line_error, checkpoint_world, image_idx, label_idx, run_cli,
                       subprocess_env, tree)

pytestmark = pytest.mark.usefixtures("no_real_data")

TRAINED = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model = Model(Arch(h1=32, h2=16, latent=8), max_batch=64, threads=1)
    model.init_params(0)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(40, 784), dtype=np.uint8)
    labels = (np.arange(40) % 10).astype(np.uint8)
    return checkpoint_world(tmp_path_factory.mktemp("shard"), model, TRAINED, images, labels)


# ---------------------------------------------------------------- the shard plan


def test_shares_cover_every_unit_once_in_order():
    for total in (0, 1, 2, 7, 10, 101):
        for n in (1, 2, 3, 4, 7, 12):
            shares = [Shard(k, n).share(total) for k in range(1, n + 1)]
            assert shares[0][0] == 0 and shares[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            sizes = [stop - start for start, stop in shares]
            assert max(sizes) - min(sizes) <= 1


def test_parse_shard():
    assert parse_shard(None) is None
    assert parse_shard("2/4") == Shard(2, 4) and parse_shard(" 1 / 1 ") == Shard(1, 1)
    for bad in ("0/4", "5/4", "1/0", "2", "a/b", "1/2/3", "-1/2", ""):
        with pytest.raises(CvaeError, match="--shard"):
            parse_shard(bad)


def slurm_env(task, low=0, step=1, count=4, high=None):
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low),
           "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_TASK_COUNT": str(count)}
    if high is not None:
        env["SLURM_ARRAY_TASK_MAX"] = str(high)
    return env


def test_slurm_shard_from_the_array_variables():
    assert [parse_shard("slurm", slurm_env(t)) for t in range(4)] == [Shard(k, 4) for k in (1, 2, 3, 4)]
    # --array=10-20:5: tasks 10, 15, 20
    assert [parse_shard("slurm", slurm_env(t, 10, 5, 3, 20)) for t in (10, 15, 20)] == \
        [Shard(1, 3), Shard(2, 3), Shard(3, 3)]
    with pytest.raises(CvaeError, match="SLURM_ARRAY_TASK_ID.*not set"):
        parse_shard("slurm", {})
    # --array=0,2,7 (count 3, min 0, max 7): no even steps, so no task knows its share
    with pytest.raises(CvaeError, match="evenly stepped"):
        parse_shard("slurm", slurm_env(2, 0, 1, 3, 7))
    with pytest.raises(CvaeError, match="not integers"):
        parse_shard("slurm", {**slurm_env(1), "SLURM_ARRAY_TASK_ID": "x"})


def test_shard_slurm_outside_an_array_is_a_one_line_error(capsys, world, tmp_path, monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                 "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    code, out, err = run_cli(capsys, "generate", "--checkpoint", world["run"], "--shard", "slurm",
                             "--out", tmp_path / "g.pgm")
    assert_one_line_error(code, err, "--shard slurm needs a Slurm job array task")
    assert not (tmp_path / "g.pgm").exists()
    code, out, err = run_cli(capsys, "generate", "--checkpoint", world["run"], "--shard", "3/2")
    assert_one_line_error(code, err, "--shard 3/2")


# ---------------------------------------------------------------- draws by global index


def test_keyed_normals_depend_on_the_global_index_only(monkeypatch):
    monkeypatch.setattr(sheets, "DRAW_BLOCK", 10)
    whole = sheets.KeyedNormals(7).standard_normal((40, 3))
    # block 0 is default_rng(seed) itself: small generations keep the draws they always had
    assert np.array_equal(whole[:10], np.random.default_rng(7).standard_normal((10, 3), dtype=np.float32))
    child = np.random.default_rng(np.random.SeedSequence(7, spawn_key=(2,)))
    assert np.array_equal(whole[20:30], child.standard_normal((10, 3), dtype=np.float32))
    for first in (0, 3, 9, 10, 11, 24):
        draws = sheets.KeyedNormals(7, first)
        pieces = [draws.standard_normal((k, 3)) for k in (1, 4, 8)]
        assert np.array_equal(np.concatenate(pieces), whole[first:first + 13]), first
    assert not np.array_equal(whole[:10], whole[10:20])


def test_codes_ahead_draws_what_the_loop_draws(monkeypatch):
    """One ahead on a second thread, in order, across draw blocks, each item's draws made
    codes on that thread; and a consumer that stops early (an error while decoding) leaves
    no thread behind and no draw skipped."""
    monkeypatch.setattr(sheets, "DRAW_BLOCK", 10)
    whole = sheets.KeyedNormals(5, 3).standard_normal((30, 4))
    sizes = [1, 7, 0, 12, 10]
    makers = set()

    def codes(n, z):
        makers.add(threading.get_ident())
        return n, 2 * z      # 2z: exact, so the draws can be checked bit for bit

    waited = [0.0]
    got = list(sheets.codes_ahead(sheets.KeyedNormals(5, 3), sizes, lambda n: n, 4, codes,
                                  waited))
    assert [item for item, _ in got] == sizes
    assert all(n == item for item, (n, _) in got)
    assert np.array_equal(np.concatenate([z / 2 for _, (_, z) in got]), whole)
    assert makers and threading.get_ident() not in makers and waited[0] >= 0
    assert list(sheets.codes_ahead(sheets.KeyedNormals(5), [], len, 4, codes, waited)) == []
    threads = threading.active_count()
    early = sheets.codes_ahead(sheets.KeyedNormals(5, 3), sizes, lambda n: n, 4, codes, waited)
    assert np.array_equal(next(early)[1][1], 2 * whole[:1])
    assert threading.active_count() == threads + 1
    early.close()
    assert threading.active_count() == threads


def spin_count(argv, **env):
    """libgomp's spin count in a fresh `python -m cvae ARGV` process (OMP_DISPLAY_ENV)."""
    proc = subprocess.run([sys.executable, "-m", "cvae", *argv], capture_output=True, text=True,
                          env={**subprocess_env(), "OMP_DISPLAY_ENV": "verbose", **env},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr).group(1)


def test_generate_threads_sleep_when_waiting_unless_told(world, tmp_path):
    """generate's OpenMP threads sleep at once when they wait (its loops alternate with the
    writer and drawing threads); an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins, and other
    commands keep libgomp's default spin."""
    gen = ["generate", "--checkpoint", world["ckpt"], "--per-digit", "2", "--threads", "2",
           "--out", str(tmp_path / "x.pgm")]
    assert spin_count(gen) == "0"
    assert spin_count(gen, GOMP_SPINCOUNT="1234") == "1234"
    assert spin_count(gen, OMP_WAIT_POLICY="active") != "0"
    assert spin_count(["reconstruct", "--checkpoint", world["ckpt"], "--data", world["data"],
                       "--n", "2", "--out", str(tmp_path / "r.pgm")]) not in ("0", "1234")


# ---------------------------------------------------------------- sheets


@pytest.mark.parametrize("block", [sheets.DRAW_BLOCK, 7])
def test_sharded_sheets_are_the_unsharded_sheets(capsys, world, tmp_path, monkeypatch, block):
    """Every N, including more shards than sheets: the same files, byte for byte; with draw
    blocks of 7 digits the shards also start inside and across blocks."""
    monkeypatch.setattr(sheets, "DRAW_BLOCK", block)
    common = ["generate", "--checkpoint", world["ckpt"], "--per-digit", "9", "--cols", "4",
              "--max-rows", "2", "--seed", "3", "--temperature", "0.9", "--threads", "1"]
    whole = tmp_path / "whole"
    whole.mkdir()
    code, out, err = run_cli(capsys, *common, "--out", whole / "g.pgm")
    assert code == 0, err
    expected = tree(whole)
    assert len(expected) == 2 * 6  # 4 digits x 3 rows = 12 rows, 2 per sheet: 6 sheets
    for n in (1, 3, 4, 8):
        out_dir = tmp_path / f"n{n}"
        out_dir.mkdir()
        for k in range(1, n + 1):
            code, out, err = run_cli(capsys, *common, "--out", out_dir / "g.pgm", "--shard", f"{k}/{n}")
            assert code == 0, err
            assert out.startswith(f"shard {k}/{n}: generated "), out
            start, stop = Shard(k, n).share(6)
            if start == stop:
                assert "no sheet (more shards than sheets)" in out
            else:
                assert f"shard {k}/{n}: sheets" in err
        assert tree(out_dir) == expected, n


# ---------------------------------------------------------------- IDX data sets


def generate_idx(capsys, world, out, *extra, per_digit=11):
    code, stdout, err = run_cli(capsys, "generate", "--checkpoint", world["ckpt"], "--format", "idx",
                                "--per-digit", per_digit, "--seed", "4", "--threads", "1",
                                "--out", out, *extra)
    assert code == 0, err
    return stdout, err


def test_idx_set_holds_the_sheets_digits_in_mnist_format(capsys, world, tmp_path):
    out = tmp_path / "set"
    stdout, _ = generate_idx(capsys, world, out)
    assert "data set train-images-idx3-ubyte, train-labels-idx1-ubyte, train-generated.json" in stdout
    # the sheet of the same generation shows the same digits
    sheet = tmp_path / "sheet.pgm"
    code, _, err = run_cli(capsys, "generate", "--checkpoint", world["ckpt"], "--per-digit", "11",
                           "--seed", "4", "--threads", "1", "--cols", "11", "--out", sheet)
    assert code == 0, err
    from cvae.images import read_pgm

    image = read_pgm(sheet)
    with open(tmp_path / "sheet.json") as f:
        cells = json.load(f)["cells"]
    pixels = np.stack([image[c["y"]:c["y"] + 28, c["x"]:c["x"] + 28].reshape(784) for c in cells])
    labels = np.array([c["label"] for c in cells], dtype=np.uint8)
    # the format, written out by hand from the IDX definition
    assert (out / "train-images-idx3-ubyte").read_bytes() == image_idx(pixels)
    assert (out / "train-labels-idx1-ubyte").read_bytes() == label_idx(labels)
    assert list(labels) == [d for d in TRAINED for _ in range(11)]
    document = json.loads((out / "train-generated.json").read_text())
    assert document["checkpoint"] == os.path.relpath(world["ckpt"], out)  # no machine paths
    assert (document["seed"], document["temperature"], document["prior"]) == (4, 1.0, "gaussian")
    assert document["count"] == 44 and document["counts"] == {str(d): 11 for d in TRAINED}
    assert (document["images"], document["split"]) == ("train-images-idx3-ubyte", "train")
    # cvae's own reader
    loaded = D.Dataset.load(out, "train")
    assert np.array_equal(loaded.images, pixels) and np.array_equal(loaded.labels, labels)


@pytest.mark.parametrize("n", [1, 3, 4, 50])
def test_merged_parts_are_the_unsharded_set(capsys, world, tmp_path, monkeypatch, n):
    monkeypatch.setattr(sheets, "IDX_BLOCK", 5)  # several blocks per part
    monkeypatch.setattr(sheets, "DRAW_BLOCK", 13)
    whole = tmp_path / "whole"
    generate_idx(capsys, world, whole)
    expected = tree(whole)
    out = tmp_path / "sharded"
    for k in range(1, n + 1):
        stdout, err = generate_idx(capsys, world, out, "--shard", f"{k}/{n}")
        assert stdout.startswith(f"shard {k}/{n}: generated ") and f"part train-{k:04d}-of-{n:04d}" in stdout
    parts = sorted(os.listdir(out / "parts"))
    assert len(parts) == 3 * n and not (out / "train-images-idx3-ubyte").exists()
    code, stdout, err = run_cli(capsys, "data", "merge", out)
    assert code == 0, err
    assert f"merged {n} part(s), 44 digits" in stdout
    merged = {name: body for name, body in tree(out).items() if not name.startswith("parts")}
    assert merged == expected
    assert sorted(os.listdir(out / "parts")) == parts  # left in place


def test_merge_names_the_missing_parts_and_refuses_mixed_generations(capsys, world, tmp_path):
    out = tmp_path / "set"
    for k in (1, 3):
        generate_idx(capsys, world, out, "--shard", f"{k}/4")
    code, _, err = run_cli(capsys, "data", "merge", out)
    assert_one_line_error(code, err, "2 of 4 parts missing", "parts 2, 4",
                          "train-0002-of-0004-generated.json", "train-0004-of-0004-generated.json")
    assert not (out / "train-images-idx3-ubyte").exists()
    generate_idx(capsys, world, out, "--shard", "2/4", "--seed", "5")
    generate_idx(capsys, world, out, "--shard", "4/4")
    code, _, err = run_cli(capsys, "data", "merge", out)
    assert_one_line_error(code, err, "train-0002-of-0004-generated.json comes from another generation")
    generate_idx(capsys, world, out, "--shard", "1/3")
    code, _, err = run_cli(capsys, "data", "merge", out)
    assert_one_line_error(code, err, "different splittings (N = 3, 4)")
    code, _, err = run_cli(capsys, "data", "merge", tmp_path / "nothing")
    assert_one_line_error(code, err, "no parts/ directory")
    code, _, err = run_cli(capsys, "data", "merge", out, "--split", "test")
    assert_one_line_error(code, err, "no parts of the test split")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", world["ckpt"], "--format", "idx")
    assert_one_line_error(code, err, "--format idx needs --out DIR")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", world["ckpt"], "--format", "idx",
                           "--out", tmp_path / "no" / "such")
    assert_one_line_error(code, err, "does not exist")


def test_generation_is_streamed_in_blocks(world, tmp_path, monkeypatch):
    """20,000 digits (15.7 MB of pixels) in blocks of 1,000: the memory Python and numpy
    allocate stays below a quarter of the pixels, so 10^7 digits need no 10^7 x 784 bytes."""
    monkeypatch.setattr(sheets, "IDX_BLOCK", 1000)
    model, _ = model_from_checkpoint(world["ckpt"], threads=1, max_batch=64)
    total = 4 * 5000 * 784
    tracemalloc.start()
    try:
        sheets.generate_idx(model, tuple(TRAINED), tmp_path, per_digit=5000, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert os.path.getsize(tmp_path / "train-images-idx3-ubyte") == 16 + total
    assert peak < total / 4, peak


def test_cvae_trains_on_a_generated_set(capsys, world, tmp_path):
    out = tmp_path / "set"
    generate_idx(capsys, world, out, per_digit=40)
    generate_idx(capsys, world, out, "--split", "test", "--seed", "9", per_digit=10)
    assert (out / "t10k-generated.json").is_file()
    test_images = D.read_idx_images(out / "t10k-images-idx3-ubyte")
    assert len(test_images) == 40
    assert not np.array_equal(test_images[:10], D.read_idx_images(out / "train-images-idx3-ubyte")[:10])
    code, stdout, err = run_cli(capsys, "train", "--data", out, "--digits", "0-3", "--hidden", "32,16",
                                "--latent", "4", "--epochs", "1", "--batch", "16", "--threads", "1",
                                "--out", tmp_path / "run", "--quiet", "--no-images")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert os.path.abspath(config["data_dir"]) == os.path.abspath(out)
    meta_lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(meta_lines) == 1 and np.isfinite(json.loads(meta_lines[0])["test_neg_elbo"])
    code, stdout, err = run_cli(capsys, "classifier", "train", "--data", out, "--epochs", "1",
                                "--batch", "32", "--threads", "1", "--quiet",
                                "--out", tmp_path / "judge.cvae")
    assert code == 0, err
    assert (tmp_path / "judge.cvae").is_file()


def test_readme_quotes_the_sbatch_files_as_they_are():
    """tests/test_slurm.py submits examples/slurm/*.sbatch: the README must show those files,
    not a copy that could drift."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "README.md")) as f:
        readme = f.read()
    examples = os.path.join(repo, "examples", "slurm")
    names = sorted(os.listdir(examples))
    assert names == ["generate.sbatch", "merge.sbatch", "sweep.sbatch"]
    for name in names:
        with open(os.path.join(examples, name)) as f:
            assert f"```sh\n{f.read()}```\n" in readme, name


def test_flow_prior_shards_are_the_unsharded_run(world, tmp_path, monkeypatch):
    """The flow carries each digit's draw on its own (any batch, any position in it), so the
    flow prior's shards match too: sheets and IDX parts, across draw blocks of 7."""
    from cvae.prior import FlowPrior, FlowSampler, PriorArch

    monkeypatch.setattr(sheets, "DRAW_BLOCK", 7)
    monkeypatch.setattr(sheets, "IDX_BLOCK", 6)
    model, _ = model_from_checkpoint(world["ckpt"], threads=1, max_batch=64)
    net = FlowPrior(PriorArch(latent=3, hidden=16, blocks=1, dims=(1, 4, 6)), threads=1)
    net.init_params(2)
    flow = FlowSampler(net, tmp_path / "prior.cvae", model.arch.latent)
    digits = tuple(TRAINED)
    whole = tmp_path / "whole"
    whole.mkdir()
    sheets.sample_sheets(model, digits, whole / "f.pgm", per_digit=9, cols=4, max_rows=2, seed=1,
                         prior=flow)
    sheets.generate_idx(model, digits, whole / "set", per_digit=9, seed=1, prior=flow)
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in (1, 2, 3):
        sheets.sample_sheets(model, digits, parts / "f.pgm", per_digit=9, cols=4, max_rows=2,
                             seed=1, prior=flow, shard=Shard(k, 3))
        sheets.generate_idx(model, digits, parts / "set", per_digit=9, seed=1, prior=flow,
                            shard=Shard(k, 3))
    D.merge_idx_parts(parts / "set")
    assert tree(parts, skip=("parts",)) == tree(whole) and len(tree(whole)) == 15
    document = json.loads((whole / "set" / "train-generated.json").read_text())
    assert document["prior"] == "flow" and document["steps"] == 2
    # the flow moved the draws: not the N(0, I) digits
    gaussian = tmp_path / "gaussian"
    sheets.generate_idx(model, digits, gaussian, per_digit=9, seed=1)
    assert (gaussian / "train-images-idx3-ubyte").read_bytes() != \
        (whole / "set" / "train-images-idx3-ubyte").read_bytes()
