"""cvae reconstruct / generate / interpolate and write_run_images, on a tiny untrained model."""

import json
import os
import shutil
import time

import numpy as np
import pytest

from cvae.cli import build_parser
from cvae.checkpoint import save_checkpoint
from cvae.data import Dataset
from cvae.errors import CvaeError
from cvae.images import read_pgm, to_uint8, write_sheet
from cvae.model import Arch, Model, model_from_checkpoint
from cvae import rundir as R
from cvae import sheets
from .conftest import checkpoint_world

TRAINED = [0, 1, 2, 3]
N_TEST = 40  # labels i % 10: digits 4-9 are in the test file but not trained
PITCH = 30   # 28-pixel cells and a 2-pixel gutter




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model = Model(Arch(h1=32, h2=16, latent=8), max_batch=64, threads=1)
    model.init_params(0)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(N_TEST, 784), dtype=np.uint8)
    labels = (np.arange(N_TEST) % 10).astype(np.uint8)
    return checkpoint_world(tmp_path_factory.mktemp("sample"), model, TRAINED, images, labels)


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path


def run(*argv):
    """A sheet command, in-process; a bad option or input raises CvaeError."""
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def load_sheet(path):
    with open(os.path.splitext(path)[0] + ".json") as f:
        return read_pgm(path), json.load(f)


def cell(image, c):
    return image[c["y"]:c["y"] + 28, c["x"]:c["x"] + 28].reshape(784)


def reference_model(world):
    model, _ = model_from_checkpoint(world["ckpt"], threads=1, max_batch=64)
    return model


def check_geometry(image, doc, rows, cols):
    assert doc["rows"] == rows and doc["cols"] == cols
    assert image.shape == (rows * PITCH - 2, cols * PITCH - 2)
    assert (doc["width"], doc["height"]) == (image.shape[1], image.shape[0])
    for i, c in enumerate(doc["cells"]):
        row, col = divmod(i, cols)
        assert (c["x"], c["y"], c["row"], c["col"]) == (col * PITCH, row * PITCH, row, col)


# ---------------------------------------------------------------- generate


def test_generate_one_row_per_digit_matches_direct_decoding(world, out_dir, capsys):
    out = out_dir / "g.pgm"
    assert run("generate", "--checkpoint", world["run"], "--per-digit", 7, "--seed", 5,
               "--temperature", 0.8, "--threads", 1, "--out", out) == 0
    assert "generated 28 digits in" in capsys.readouterr().out
    image, doc = load_sheet(out)
    check_geometry(image, doc, rows=4, cols=7)
    assert [c["label"] for c in doc["cells"]] == [d for d in TRAINED for _ in range(7)]
    assert all(c["kind"] == "sample" for c in doc["cells"])
    assert [c["sample"] for c in doc["cells"]] == list(range(7)) * 4
    extra = doc["extra"]
    assert extra["temperature"] == 0.8 and extra["seed"] == 5
    # Recorded relative to the sheet's directory: no machine paths in the file.
    assert extra["checkpoint"] == os.path.relpath(world["ckpt"], os.path.dirname(out))
    assert (extra["sheet"], extra["sheets"]) == (1, 1)
    # z ~ N(0, T^2 I) from default_rng(seed), in cell order, decoded with the cell's label.
    model = reference_model(world)
    z = np.random.default_rng(5).standard_normal((28, 8), dtype=np.float32) * np.float32(0.8)
    labels = np.repeat(np.array(TRAINED, dtype=np.uint8), 7)
    expected = to_uint8(model.decode(z, labels))
    for i, c in enumerate(doc["cells"]):
        np.testing.assert_array_equal(cell(image, c), expected[i])


def test_generate_large_n_pads_rows_and_splits_sheets(world, out_dir):
    out = out_dir / "many.pgm"
    # 45 per digit at the 20-column limit: 3 rows per digit (the last with 15 blanks); 2 digits
    # = 6 rows, 4 rows per sheet -> 2 sheets.
    run("generate", "--checkpoint", world["ckpt"], "--digits", "1,3", "--per-digit", 45,
        "--max-rows", 4, "--threads", 1, "--out", out)
    assert not out.exists()
    paths = [out_dir / "many-0001.pgm", out_dir / "many-0002.pgm"]
    assert not (out_dir / "many-0003.pgm").exists()
    cells, blanks = [], 0
    for number, path in enumerate(paths, 1):
        image, doc = load_sheet(path)
        rows = 4 if number == 1 else 2
        check_geometry(image, doc, rows=rows, cols=20)
        assert (doc["extra"]["sheet"], doc["extra"]["sheets"]) == (number, 2)
        for c in doc["cells"]:
            if c["kind"] == "blank":
                assert c["label"] is None and not cell(image, c).any()
                blanks += 1
        cells += doc["cells"]
    assert [c["index"] for c in cells] == list(range(120))
    assert blanks == 30
    for digit, block in zip((1, 3), (cells[:60], cells[60:])):
        assert [c["label"] for c in block] == [digit] * 45 + [None] * 15
        assert [c.get("sample") for c in block[:45]] == list(range(45))


def test_generate_writes_the_bytes_of_the_per_cell_path(world, out_dir):
    """Pins generate's files byte for byte: every sheet (blank cells, several sheets) equals
    what write_sheet makes of the reference decoding (model.decode, then to_uint8) with a
    label and a dict per cell, as sample sheets were written before write_sheet_groups."""
    os.makedirs(out_dir / "a")
    os.makedirs(out_dir / "b")
    run("generate", "--checkpoint", world["ckpt"], "--digits", "0,2,3", "--per-digit", 13,
        "--cols", 5, "--max-rows", 4, "--seed", 9, "--temperature", 0.7, "--threads", 2,
        "--out", out_dir / "a" / "g.pgm")
    model = reference_model(world)
    z = np.random.default_rng(9).standard_normal((39, 8), dtype=np.float32) * np.float32(0.7)
    digit_labels = np.repeat(np.array([0, 2, 3], dtype=np.uint8), 13)
    decoded = to_uint8(model.decode(z, digit_labels))
    # 13 per digit in rows of 5: 15 cells each, the last two blank
    images = np.zeros((45, 784), dtype=np.uint8)
    labels, extras = [], []
    for i in range(45):
        digit, k = divmod(i, 15)
        if k < 13:
            images[i] = decoded[digit * 13 + k]
            labels.append([0, 2, 3][digit])
            extras.append({"kind": "sample", "sample": k})
        else:
            labels.append(None)
            extras.append({"kind": "blank"})
    names = sorted(os.listdir(out_dir / "a"))
    assert names == [f"g-000{s}.{e}" for s in (1, 2, 3) for e in ("json", "pgm")]
    for number, start in ((1, 0), (2, 20), (3, 40)):
        stop = min(start + 20, 45)
        with open(out_dir / "a" / f"g-000{number}.json") as f:
            extra = json.load(f)["extra"]
        write_sheet(out_dir / "b" / f"g-000{number}.pgm", images[start:stop],
                    labels[start:stop], 5, cell_extras=extras[start:stop], extra=extra,
                    first_index=start)
    for name in names:
        assert (out_dir / "a" / name).read_bytes() == (out_dir / "b" / name).read_bytes(), name


def test_generate_is_deterministic_per_seed(world, out_dir):
    def sheet(name, seed):
        path = out_dir / name
        run("generate", "--checkpoint", world["ckpt"], "--seed", seed, "--threads", 1, "--out", path)
        return path.read_bytes()

    assert sheet("a.pgm", 3) == sheet("b.pgm", 3)
    assert sheet("a.pgm", 3) != sheet("c.pgm", 4)


def test_generate_temperature_zero_repeats_one_image_per_digit(world, out_dir):
    out = out_dir / "t0.pgm"
    run("generate", "--checkpoint", world["ckpt"], "--temperature", 0, "--per-digit", 5,
        "--threads", 1, "--out", out)
    image, doc = load_sheet(out)
    rows = [[cell(image, c) for c in doc["cells"] if c["row"] == r] for r in range(4)]
    for row in rows:
        for other in row[1:]:
            np.testing.assert_array_equal(other, row[0])
    assert not np.array_equal(rows[0][0], rows[1][0])  # the label still matters


def test_generate_defaults_into_the_run_directory(world, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(world["ckpt"], run_dir / "epoch-0002.cvae")
    run("generate", "--checkpoint", run_dir, "--threads", 1)  # no last.cvae: the latest epoch
    image, doc = load_sheet(run_dir / "generate.pgm")
    check_geometry(image, doc, rows=4, cols=10)
    assert doc["extra"]["checkpoint"] == "epoch-0002.cvae"  # beside the sheet


# ---------------------------------------------------------------- reconstruct


def test_reconstruct_pairs_originals_with_reconstructions(world, out_dir):
    out = out_dir / "r.pgm"
    run("reconstruct", "--checkpoint", world["ckpt"], "--data", world["data"], "--n", 10,
        "--seed", 2, "--threads", 1, "--out", out)
    image, doc = load_sheet(out)
    check_geometry(image, doc, rows=2, cols=16)  # 8 pairs per row
    cells = doc["cells"]
    assert len(cells) == 20
    assert [c["kind"] for c in cells] == ["original", "reconstruction"] * 10
    originals, recons = cells[0::2], cells[1::2]
    sources = [c["source"] for c in originals]
    assert [c["source"] for c in recons] == sources
    assert len(set(sources)) == 10
    labels = [c["label"] for c in originals]
    assert [c["label"] for c in recons] == labels
    assert labels == sorted(labels)
    counts = np.bincount(labels, minlength=10)
    assert counts[4:].sum() == 0 and sorted(counts[:4]) == [2, 2, 3, 3]  # balanced, trained only
    for c in originals:
        np.testing.assert_array_equal(cell(image, c), world["images"][c["source"]])
        assert c["label"] == world["labels"][c["source"]]
    model = reference_model(world)
    pixels = world["images"][sources]
    lab = world["labels"][sources]
    mu, _ = model.encode(np.ascontiguousarray(pixels), np.ascontiguousarray(lab))
    expected = to_uint8(model.decode(mu, lab))
    for i, c in enumerate(recons):
        np.testing.assert_array_equal(cell(image, c), expected[i])


def test_reconstruct_clamps_to_the_test_images_available(world, out_dir, capsys):
    out = out_dir / "all.pgm"
    run("reconstruct", "--checkpoint", world["ckpt"], "--data", world["data"], "--n", 1000,
        "--threads", 1, "--out", out)
    assert "only 16 test images" in capsys.readouterr().out
    _, doc = load_sheet(out)
    assert len(doc["cells"]) == 32


# ---------------------------------------------------------------- interpolate


def test_interpolate_same_label_paths_and_class_rows(world, out_dir):
    out = out_dir / "i.pgm"
    run("interpolate", "--checkpoint", world["ckpt"], "--data", world["data"], "--steps", 4,
        "--pairs", 6, "--seed", 1, "--threads", 1, "--out", out)
    image, doc = load_sheet(out)
    check_geometry(image, doc, rows=6, cols=6)
    model = reference_model(world)
    starts = []
    for r in range(6):
        row = doc["cells"][r * 6:(r + 1) * 6]
        assert [c["kind"] for c in row] == ["original"] + ["interpolation"] * 4 + ["original"]
        assert {c["label"] for c in row} == {TRAINED[r % 4]}
        a, b = row[0]["source"], row[-1]["source"]
        assert a != b and world["labels"][a] == world["labels"][b] == TRAINED[r % 4]
        assert [c["t"] for c in row[1:-1]] == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-6)
        assert all((c["from"], c["to"]) == (a, b) and "source" not in c for c in row[1:-1])
        np.testing.assert_array_equal(cell(image, row[0]), world["images"][a])
        np.testing.assert_array_equal(cell(image, row[-1]), world["images"][b])
        lab = np.array([row[0]["label"]] * 2, dtype=np.uint8)
        mu, _ = model.encode(np.ascontiguousarray(world["images"][[a, b]]), lab)
        ends = to_uint8(model.decode(mu, lab))
        np.testing.assert_array_equal(cell(image, row[1]), ends[0])  # t = 0: decode(mu_A)
        np.testing.assert_array_equal(cell(image, row[4]), ends[1])  # t = 1: decode(mu_B)
        starts.append(a)

    image, doc = load_sheet(out_dir / "i-classes.pgm")
    check_geometry(image, doc, rows=6, cols=5)
    for r in range(6):
        row = doc["cells"][r * 5:(r + 1) * 5]
        assert [c["kind"] for c in row] == ["original"] + ["class"] * 4
        assert [c["label"] for c in row[1:]] == TRAINED
        assert {c["source"] for c in row} == {starts[r]}
        a = starts[r]
        mu, _ = model.encode(np.ascontiguousarray(world["images"][[a]]), world["labels"][[a]])
        expected = to_uint8(model.decode(np.repeat(mu, 4, axis=0), np.array(TRAINED, np.uint8)))
        for i, c in enumerate(row[1:]):
            np.testing.assert_array_equal(cell(image, c), expected[i])


# ---------------------------------------------------------------- after training


def test_write_run_images(world, tmp_path):
    model = reference_model(world)
    test_set = Dataset.load(world["data"], "test", TRAINED)
    paths = R.write_run_sheets(model, test_set, tmp_path, 0, TRAINED)
    names = ["reconstructions.pgm", "samples.pgm", "interpolations.pgm", "interpolations-classes.pgm"]
    assert paths == [os.path.join(tmp_path, n) for n in names]
    for path in paths:
        image, doc = load_sheet(path)
        assert image.shape == (doc["height"], doc["width"])
    image, doc = load_sheet(paths[1])
    check_geometry(image, doc, rows=4, cols=10)
    assert [c["label"] for c in doc["cells"]] == [d for d in TRAINED for _ in range(10)]
    assert doc["extra"]["temperature"] == 1.0
    _, doc = load_sheet(paths[2])
    assert doc["rows"] == 5  # max(5, len(digits)) pairs
    # The commands use the same functions: same seed, same samples.
    run("generate", "--checkpoint", world["ckpt"], "--seed", 0, "--threads", 1,
        "--out", tmp_path / "g.pgm")
    assert read_pgm(tmp_path / "g.pgm").tobytes() == read_pgm(paths[1]).tobytes()


# ---------------------------------------------------------------- errors


def error(*argv):
    with pytest.raises(CvaeError) as info:
        run(*argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_write_nothing(world, tmp_path):
    ckpt, data = world["ckpt"], world["data"]
    out = tmp_path / "x.pgm"
    gen = ("generate", "--checkpoint", ckpt, "--threads", 1, "--out", out)
    assert "trained on digits 0-3 only, not 5,7" in error(*gen, "--digits", "5,7,1")
    assert "--per-digit" in error(*gen, "--per-digit", 0)
    assert "--temperature" in error(*gen, "--temperature", -0.5)
    assert "--temperature" in error(*gen, "--temperature", "nan")
    assert "--max-rows" in error(*gen, "--max-rows", 0)
    assert "--cols" in error(*gen, "--cols", -1)
    assert "--threads" in error("generate", "--checkpoint", ckpt, "--threads", 0, "--out", out)
    assert "--seed" in error(*gen, "--seed", -1)
    assert "not a digit" in error(*gen, "--digits", "12")
    assert "--n" in error("reconstruct", "--checkpoint", ckpt, "--data", data, "--n", 0, "--out", out)
    assert "--steps" in error("interpolate", "--checkpoint", ckpt, "--data", data, "--steps", 1,
                              "--out", out)
    assert "--pairs" in error("interpolate", "--checkpoint", ckpt, "--data", data, "--pairs", 0,
                              "--out", out)
    assert "does not exist" in error("generate", "--checkpoint", tmp_path / "nope.cvae", "--out", out)
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint" in error("generate", "--checkpoint", tmp_path / "empty", "--out", out)
    damaged = tmp_path / "damaged.cvae"
    damaged.write_bytes(ckpt.read_bytes()[:-100])
    assert "damaged" in error("generate", "--checkpoint", damaged, "--out", out)
    assert "does not exist" in error(*gen[:-1], tmp_path / "no" / "dir.pgm")
    assert ".pgm" in error(*gen[:-1], tmp_path / "x.png")
    assert "not found" in error("reconstruct", "--checkpoint", ckpt, "--data", tmp_path / "empty",
                                "--out", out)
    assert sorted(os.listdir(tmp_path)) == ["damaged.cvae", "empty"]
    assert os.listdir(tmp_path / "empty") == []


def test_checkpoint_without_digits_is_an_error(world, tmp_path):
    model = reference_model(world)
    path = tmp_path / "nodigits.cvae"
    save_checkpoint(path, "cvae", {"arch": model.arch.to_json()}, model.state_sections())
    assert "which digits" in error("generate", "--checkpoint", path, "--threads", 1)


def test_cli_main_runs_the_commands(world, tmp_path, capsys):
    from cvae import cli

    out = tmp_path / "g.pgm"
    assert cli.main(["generate", "--checkpoint", str(world["ckpt"]), "--threads", "1",
                     "--out", str(out)]) == 0
    assert out.exists()
    assert cli.main(["generate", "--checkpoint", str(world["ckpt"]), "--digits", "9",
                     "--out", str(out)]) == 2
    assert "trained on digits 0-3 only" in capsys.readouterr().err
    for command in ("reconstruct", "generate", "interpolate"):
        assert cli.main([command, "--help"]) == 0
        assert "--checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------- speed (reported, not asserted)


def test_generate_speed_report(world, tmp_path, capsys):
    model = Model(Arch(h1=32, h2=16, latent=8), max_batch=256, threads=1)
    model.init_params(0)
    start = time.perf_counter()
    paths, n, seconds = sheets.sample_sheets(model, TRAINED, tmp_path / "speed.pgm", per_digit=500,
                                             seed=0, max_rows=100)
    total = time.perf_counter() - start
    assert n == 2000 and len(paths) == 1
    with capsys.disabled():
        print(f"\n[speed] tiny model, 1 thread: {n} digits decoded in {seconds:.3f} s "
              f"({n / seconds:,.0f} digits/s); {total:.3f} s including the sheet")
