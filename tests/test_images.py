import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from cvae import images
from cvae.atomic import json_default
from cvae.errors import CvaeError
from cvae.images import (
    numbered_sheet_path,
    read_pgm,
    sidecar_path,
    split_into_sheets,
    to_uint8,
    write_pgm,
    write_sheet,
    write_sheets,
)

from .conftest import leftover_temp_files


def distinct_digits(n, seed=0):
    """n random 28x28 uint8 images, each different, so a misplaced cell cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(n, 784), dtype=np.uint8)


def test_pgm_header_is_exact_and_pixels_follow_row_major(tmp_path):
    image = np.array([[0, 1, 2], [253, 254, 255]], dtype=np.uint8)
    path = tmp_path / "tiny.pgm"
    write_pgm(path, image)
    assert path.read_bytes() == b"P5\n3 2\n255\n" + bytes([0, 1, 2, 253, 254, 255])


def test_probabilities_round_to_nearest_and_clip():
    p = np.array([0.0, 1.0, 0.5, 0.001, 0.999, -0.3, 1.7, 100.4 / 255, 100.6 / 255])
    assert to_uint8(p).tolist() == [0, 255, 128, 0, 255, 0, 255, 100, 101]
    assert to_uint8(np.float32([0.2, 0.8])).tolist() == [round(255 * 0.2), round(255 * 0.8)]


def test_uint8_passes_through_unchanged():
    image = np.arange(256, dtype=np.uint8)
    assert to_uint8(image) is image


def test_nan_pixels_are_a_clear_error_and_other_dtypes_a_bug():
    with pytest.raises(CvaeError, match="NaN"):
        to_uint8(np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="int64"):
        to_uint8(np.array([1, 2], dtype=np.int64))


def test_read_pgm_round_trips(tmp_path):
    image = distinct_digits(1).reshape(28, 28)
    image[0, 0] = ord("\n")  # a whitespace-valued first pixel must not be mistaken for header
    write_pgm(tmp_path / "d.pgm", image)
    back = read_pgm(tmp_path / "d.pgm")
    assert back.dtype == np.uint8 and back.shape == (28, 28)
    np.testing.assert_array_equal(back, image)


def test_read_pgm_accepts_standard_header_whitespace_and_comments(tmp_path):
    path = tmp_path / "c.pgm"
    path.write_bytes(b"P5 # made elsewhere\n2\t1\r\n# maxval next\n255\n\x07\x08")
    assert read_pgm(path).tolist() == [[7, 8]]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a binary PGM"),
        (b"P2\n1 1\n255\n0\n", "not a binary PGM"),
        (b"P6\n1 1\n255\n\0\0\0", "not a binary PGM"),
        (b"P5\n2 2\n255\n\0\0\0", "truncated"),
        (b"P5\n1 1\n255\n\0\0", "unexpected bytes"),
        (b"P5\n1 1\n65535\n\0\0", "maxval 65535"),
        (b"P5\n0 1\n255\n", "size 0x1"),
        (b"P5\nx 1\n255\n\0", "width"),
        (b"P5\n1 1\n255", "maxval"),
        (b"P5\n99999 99999\n255\n\0", "truncated"),
    ],
)
def test_read_pgm_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.pgm"
    path.write_bytes(content)
    with pytest.raises(CvaeError, match=message) as caught:
        read_pgm(path)
    assert str(path) in str(caught.value)


def test_read_pgm_missing_file(tmp_path):
    with pytest.raises(CvaeError, match="cannot read"):
        read_pgm(tmp_path / "nope.pgm")


def test_sheet_geometry_and_sidecar_point_at_each_image(tmp_path):
    cells = distinct_digits(7)
    labels = [3, 1, 4, 1, 5, 9, 2]
    path = tmp_path / "sheet.pgm"
    document = write_sheet(
        path, cells, labels, cols=3, gutter=2, sources=[10, None, 12, 13, 14, 15, 16],
        extra={"checkpoint": "runs/a/last.cvae", "temperature": np.float32(0.5), "seed": np.int64(7)},
        cell_extras=[{"z": [0.25, -1.0]}] + [{}] * 6,
    )
    sidecar = json.loads((tmp_path / "sheet.json").read_text())
    assert sidecar == json.loads(json.dumps(document, default=json_default))
    assert (sidecar["rows"], sidecar["cols"], sidecar["cell"], sidecar["gutter"]) == (3, 3, 28, 2)
    assert (sidecar["width"], sidecar["height"]) == (3 * 28 + 2 * 2, 3 * 28 + 2 * 2)
    assert sidecar["extra"] == {"checkpoint": "runs/a/last.cvae", "temperature": 0.5, "seed": 7}

    pixels = read_pgm(path)
    assert pixels.shape == (sidecar["height"], sidecar["width"])
    covered = np.zeros(pixels.shape, dtype=bool)
    for i, entry in enumerate(sidecar["cells"]):
        x, y = entry["x"], entry["y"]
        assert (entry["row"], entry["col"], entry["index"], entry["label"]) == (i // 3, i % 3, i, labels[i])
        np.testing.assert_array_equal(pixels[y:y + 28, x:x + 28], cells[i].reshape(28, 28))
        covered[y:y + 28, x:x + 28] = True
    assert not pixels[~covered].any(), "gutters and unused cells must be black"
    assert sidecar["cells"][0]["z"] == [0.25, -1.0]
    assert sidecar["cells"][0]["source"] == 10
    assert "source" not in sidecar["cells"][1]
    # One cell per line keeps big sidecars greppable.
    assert sum('"x":' in line for line in (tmp_path / "sheet.json").read_text().splitlines()) == 7


def test_sheet_accepts_float_and_square_images_with_zero_gutter(tmp_path):
    cells = np.linspace(0, 1, 2 * 784).reshape(2, 28, 28)
    document = write_sheet(tmp_path / "f.pgm", cells, [None, 8], cols=2, gutter=0)
    pixels = read_pgm(tmp_path / "f.pgm")
    assert pixels.shape == (28, 56) and document["cells"][1]["x"] == 28
    np.testing.assert_array_equal(pixels[:, 28:], to_uint8(cells[1]))
    assert document["cells"][0]["label"] is None


def test_sheet_rejects_bad_paths_and_mismatched_inputs(tmp_path):
    with pytest.raises(CvaeError, match=r"must end in \.pgm"):
        write_sheet(tmp_path / "sheet.json", distinct_digits(1), [0], cols=1)
    with pytest.raises(ValueError, match="labels"):
        write_sheet(tmp_path / "s.pgm", distinct_digits(2), [0], cols=1)
    with pytest.raises(ValueError, match="override"):
        write_sheet(tmp_path / "s.pgm", distinct_digits(1), [0], cols=1, cell_extras=[{"x": 5}])
    with pytest.raises(ValueError, match="shape"):
        write_sheet(tmp_path / "s.pgm", np.zeros((1, 100)), [0], cols=1)
    with pytest.raises(CvaeError, match="cannot write"):
        write_sheet(tmp_path / "missing" / "s.pgm", distinct_digits(1), [0], cols=1)
    assert os.listdir(tmp_path) == []


def test_split_into_sheets():
    assert split_into_sheets(0, 5, 10) == []
    assert split_into_sheets(7, 5, 10) == [(0, 7)]
    assert split_into_sheets(50, 5, 10) == [(0, 50)]
    assert split_into_sheets(10_000, 100, 10) == [(i, i + 1000) for i in range(0, 10_000, 1000)]
    assert split_into_sheets(95, 3, 10) == [(0, 30), (30, 60), (60, 90), (90, 95)]
    with pytest.raises(ValueError):
        split_into_sheets(5, 0, 10)


def test_many_sheets_are_numbered_and_keep_global_indices(tmp_path):
    cells = distinct_digits(95)
    labels = [i % 10 for i in range(95)]
    paths = write_sheets(tmp_path / "digits.pgm", cells, labels, cols=10, max_rows=3, extra={"seed": 1})
    assert [os.path.basename(p) for p in paths] == [f"digits-000{k}.pgm" for k in range(1, 5)]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"digits-000{k}.{ext}" for k in range(1, 5) for ext in ("pgm", "json")])
    seen = []
    for number, path in enumerate(paths, 1):
        sidecar = json.loads(open(sidecar_path(path)).read())
        assert sidecar["extra"] == {"seed": 1, "sheet": number, "sheets": 4}
        assert sidecar["rows"] == (3 if number < 4 else 1)
        pixels = read_pgm(path)
        for entry in sidecar["cells"]:
            x, y, index = entry["x"], entry["y"], entry["index"]
            assert entry["label"] == labels[index]
            np.testing.assert_array_equal(pixels[y:y + 28, x:x + 28], cells[index].reshape(28, 28))
            seen.append(index)
    assert seen == list(range(95))


def test_one_sheet_keeps_the_requested_name(tmp_path):
    paths = write_sheets(tmp_path / "few.pgm", distinct_digits(4), [0, 1, 2, 3], cols=10, max_rows=3)
    assert paths == [str(tmp_path / "few.pgm")]
    assert sorted(os.listdir(tmp_path)) == ["few.json", "few.pgm"]


def test_numbered_names_grow_past_four_digits():
    assert numbered_sheet_path("out/d.pgm", 3) == "out/d-0003.pgm"
    assert numbered_sheet_path("d.pgm", 12345) == "d-12345.pgm"


def test_failed_write_leaves_old_sheet_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "s.pgm"
    write_sheet(path, distinct_digits(2, seed=1), [1, 2], cols=2)
    old_pgm, old_json = path.read_bytes(), (tmp_path / "s.json").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CvaeError, match="No space left"):
        write_sheet(path, distinct_digits(3, seed=2), [3, 4, 5], cols=3)
    with pytest.raises(CvaeError, match="No space left"):
        write_pgm(path, np.zeros((2, 2)))
    monkeypatch.undo()
    assert path.read_bytes() == old_pgm and (tmp_path / "s.json").read_bytes() == old_json
    assert leftover_temp_files(tmp_path) == []


def test_crash_between_renames_never_leaves_a_pgm_with_a_stale_sidecar(tmp_path, monkeypatch):
    path = tmp_path / "s.pgm"
    write_sheet(path, distinct_digits(2, seed=1), [1, 2], cols=2)
    real_replace = os.replace
    renames = []

    def crash_on_second_rename(src, dst):
        renames.append(os.path.basename(dst))
        if len(renames) == 2:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(CvaeError):
        write_sheet(path, distinct_digits(3, seed=2), [3, 4, 5], cols=3)
    monkeypatch.undo()
    assert renames == ["s.json", "s.pgm"]
    assert not path.exists(), "the old PGM must not survive next to the new sidecar"
    assert json.loads((tmp_path / "s.json").read_text())["cols"] == 3
    assert leftover_temp_files(tmp_path) == []


def test_pillow_reads_the_sheet(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    cells = distinct_digits(5)
    write_sheet(tmp_path / "s.pgm", cells, list(range(5)), cols=4)
    with Image.open(tmp_path / "s.pgm") as opened:
        assert opened.format == "PPM" and opened.mode == "L" and opened.size == (4 * 30 - 2, 2 * 30 - 2)
        np.testing.assert_array_equal(np.asarray(opened), read_pgm(tmp_path / "s.pgm"))


@pytest.mark.parametrize(
    "tool, expected",
    [(["pnmfile"], "PGM raw, 118 by 58  maxval 255"), (["identify"], "PGM 118x58")],
)
def test_external_tools_read_the_sheet(tmp_path, tool, expected):
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} not on PATH")
    write_sheet(tmp_path / "s.pgm", distinct_digits(5), list(range(5)), cols=4)
    result = subprocess.run(tool + [str(tmp_path / "s.pgm")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_sheet_groups_write_the_bytes_write_sheet_writes(tmp_path):
    """write_sheet_groups (a %-template per group of cells) against write_sheet (a dict and an
    encoder call per cell): the same PGM and sidecar, byte for byte, for groups in any order,
    interleaved cells, columns and constants of every JSON kind (a '%' and non-ASCII too)."""
    n, cols = 23, 4
    cells = distinct_digits(n, seed=3)
    rng = np.random.default_rng(4)
    kind = rng.integers(0, 3, n)
    labels = [None if k == 2 else int(rng.integers(0, 10)) for k in kind]
    sample = rng.integers(-5, 10**12, n)
    extras = [{"kind": "sample", "sample": int(s), "note": "100% é"} if k == 0
              else {"kind": "class", "t": 0.25, "to": [1, None, True]} if k == 1
              else {"kind": "blank"} for k, s in zip(kind, sample)]
    sources = [int(i) * 7 if k == 1 else None for i, k in enumerate(kind)]
    extra = {"seed": np.int64(3), "what": "a %d test"}
    slow = write_sheet(tmp_path / "a.pgm", cells, labels, cols, sources=sources, extra=extra,
                       cell_extras=extras, first_index=1000)

    where = [np.flatnonzero(kind == k) for k in range(3)]
    groups = [
        (where[2], {"kind": "blank", "label": None}),
        (where[0], {"kind": "sample", "note": "100% é", "sample": sample[where[0]],
                    "label": np.array([labels[i] for i in where[0]], dtype=np.int64)}),
        (where[1], {"kind": "class", "t": 0.25, "to": [1, None, True],
                    "label": np.array([labels[i] for i in where[1]], dtype=np.uint8),
                    "source": where[1] * 7}),
    ]
    fast = images.write_sheet_groups(tmp_path / "b.pgm", cells, cols, groups, extra=extra,
                                     first_index=1000)
    assert (tmp_path / "a.pgm").read_bytes() == (tmp_path / "b.pgm").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert fast == {key: value for key, value in slow.items() if key != "cells"}
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize("groups, message", [
    ([(np.arange(3), {"label": None})], "exactly once"),
    ([(np.arange(4), {"label": None}), (np.array([3]), {"label": 1})], "exactly once"),
    ([(np.arange(4), {"kind": "x"})], "needs a label"),
    ([(np.arange(4), {"label": None, "row": 1})], "may not override"),
    ([(np.arange(4), {"label": np.zeros(4)})], "integers"),
    ([(np.arange(4), {"label": np.zeros(3, dtype=int)})], "integers"),
    ([(np.array([0, 1, 2, 4]), {"label": None})], r"\[0, 4\)"),
    ([(np.arange(4), {"label": None, "t": float("nan")})], "not JSON-serializable"),
])
def test_sheet_groups_reject_bad_groups_and_write_nothing(tmp_path, groups, message):
    with pytest.raises(ValueError, match=message):
        images.write_sheet_groups(tmp_path / "s.pgm", distinct_digits(4), 2, groups)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("n, cols, gutter", [(1, 1, 2), (7, 3, 2), (9, 3, 0), (5, 8, 3)])
def test_render_sheet_puts_each_cell_at_its_place(n, cols, gutter):
    cells = distinct_digits(n, seed=n)
    canvas = images.render_sheet(cells, cols, gutter=gutter)
    pitch = 28 + gutter
    rows = -(-n // cols)
    assert canvas.shape == (rows * pitch - gutter, cols * pitch - gutter)
    assert canvas.flags.c_contiguous and canvas.dtype == np.uint8
    expected = np.zeros_like(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        expected[r * pitch:r * pitch + 28, c * pitch:c * pitch + 28] = cells[i].reshape(28, 28)
    np.testing.assert_array_equal(canvas, expected)
