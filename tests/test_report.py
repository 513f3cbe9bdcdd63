"""Pictures and the run report: curves.png and latent.png after training, the PNG encoder,
`cvae report` (a self-contained page; one-line errors), and the page in a real browser
(headless chromium: every picture decodes)."""

import html
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from cvae import cli, plots, report, rundir
from cvae import prior as P
from cvae.errors import CvaeError
from cvae.images import png_bytes, read_pgm
from .conftest import REPO, assert_one_line_error, run_cli, write_split

# The report draws a missing latent.png from $CVAE_DATA or the cache: never the real ones.
pytestmark = pytest.mark.usefixtures("no_real_data")
DIGITS = (0, 1, 2, 3)
TINY = ["--hidden", "32,16", "--latent", "4", "--batch", "16", "--threads", "1", "--prior",
        "gaussian"]
RUN_SHEETS = ["samples.pgm", "reconstructions.pgm", "interpolations.pgm",
              "interpolations-classes.pgm"]
FLOW_SHEETS = ["samples.pgm", "samples-flow.pgm", *RUN_SHEETS[1:]]


def write_data(directory, n_train=160, n_test=40, seed=0):
    """Tiny raw IDX files, labels i % 10 (so the test file has digits the run never saw)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_split(directory, prefix, rng.integers(0, 256, size=(n, 784), dtype=np.uint8), labels)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A complete tiny training run (2 epochs, digits 0-3) through the command line."""
    root = tmp_path_factory.mktemp("report")
    data = write_data(root / "data")
    run = root / "run"
    code = cli.main(["train", *TINY, "--epochs", "2", "--digits", "0-3", "--seed", "4",
                     "--data", str(data), "--out", str(run), "--quiet"])
    assert code == 0
    return {"root": root, "data": data, "run": run}


@pytest.fixture
def run_copy(world, tmp_path):
    """A private copy of the trained run (tests change it), file times kept."""
    target = tmp_path / "run"
    shutil.copytree(world["run"], target)
    return target


@pytest.fixture(scope="module")
def flow_world(world):
    """The same run trained with --prior flow: it also has prior.cvae and samples-flow.pgm."""
    run = world["root"] / "flow-run"
    code = cli.main(["train", *TINY, "--epochs", "2", "--digits", "0-3", "--seed", "4",
                     "--data", str(world["data"]), "--out", str(run), "--quiet", "--prior",
                     "flow"])
    assert code == 0
    return run


@pytest.fixture
def flow_copy(flow_world, tmp_path):
    target = tmp_path / "flow-run"
    shutil.copytree(flow_world, target)
    return target


def sample_figures(accuracy, per_digit, fid, diversity, digits=DIGITS, **more):
    return {**more, "cond_accuracy": accuracy,
            "cond_accuracy_per_digit": dict(zip(map(str, digits), per_digit)), "fid": fid,
            "fid_test_floor": 1.379, "diversity": diversity,
            "diversity_per_digit": {str(d): diversity + d / 10 for d in digits}}


def flow_eval(digits=DIGITS):
    """An eval.json of a run with its flow prior, as `cvae eval` writes it (the test data here
    has no classifier, so the figures are made up). digits: whose per-digit figures it has
    (all ten make the widest tables)."""
    extra = [0.5] * (len(digits) - 4)
    flow = sample_figures(0.82, [0.94, 0.9, 0.74, 0.7, *extra], 98.61, 4.941, digits,
                          prior="flow", steps=10, method="heun", guidance=0.0,
                          prior_file="/a/long/machine/path/of/the/run/prior.cvae")
    gaussian = sample_figures(0.34, [0.68, 0.0, 0.3, 0.38, *extra], 300.74, 10.32, digits,
                              prior="gaussian")
    return {"neg_elbo": 143.81, "k": 2, "samples": 50, "temperature": 1.0, "prior": "flow",
            "prior_settings": {k: flow[k] for k in ("prior", "steps", "method", "guidance")},
            **{k: flow[k] for k in gaussian if k != "prior"}, "diversity_test": 10.229,
            "diversity_test_per_digit": {str(d): 10 + d / 10 for d in digits},
            "by_prior": {"flow": flow, "gaussian": gaussian}}


def text_of(fragment):
    """A piece of the page as a reader sees it: tags dropped, entities decoded, spaces single."""
    inline = re.sub(r"</?(b|code)>", "", fragment)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", inline)).split())


def section(path, anchor):
    return open(path, encoding="ascii").read().split(f'id="{anchor}"')[1].split("</section>")[0]


def open_png(data):
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def png_chunks(data):
    """The chunk types of a PNG file, in order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    kinds, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kinds.append(data[position + 4:position + 8].decode("ascii"))
        position += 12 + length
    return kinds


# ---------------------------------------------------------------- the PNG encoder


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (28, 28), (58, 298), (301, 17)])
def test_png_encoder_round_trips_through_pillow(shape):
    pixels = np.random.default_rng(shape[0] * 1000 + shape[1]).integers(0, 256, shape, dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    data = png_bytes(pixels)
    image = open_png(data)
    assert image.mode == "L" and image.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(image), pixels)
    assert png_chunks(data) == ["IHDR", "IDAT", "IEND"]
    assert png_bytes(pixels) == data  # no time stamp: the same pixels, the same bytes


def test_png_encoder_takes_probabilities_like_the_pgm_writer():
    probabilities = np.linspace(0, 1, 28 * 28).reshape(28, 28)
    image = open_png(png_bytes(probabilities))
    np.testing.assert_array_equal(np.asarray(image),
                                  np.clip(np.rint(probabilities * 255), 0, 255).astype(np.uint8))


def test_png_encoder_chunks_have_valid_crcs():
    data = png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))
    position = 8
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        body = data[position + 4:position + 8 + length]
        crc = int.from_bytes(data[position + 8 + length:position + 12 + length], "big")
        assert zlib.crc32(body) == crc
        position += 12 + length


@pytest.mark.parametrize("bad", [np.zeros((0, 5), np.uint8), np.zeros((3, 3, 3), np.uint8),
                                 np.zeros(10, np.uint8)])
def test_png_encoder_refuses_non_images(bad):
    with pytest.raises(ValueError):
        png_bytes(bad)


# ---------------------------------------------------------------- the run's pictures


def test_a_finished_run_has_curves_and_latent_pictures(world):
    run = world["run"]
    for name in RUN_SHEETS:
        assert (run / name).is_file()
    curves = open_png((run / "curves.png").read_bytes())
    latent = open_png((run / "latent.png").read_bytes())
    assert curves.size == (1300, 750)
    assert latent.size == (800, 650)
    for image in (curves, latent):
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50, "an (almost) blank picture"
        assert "Software" not in image.info  # no version or time in the PNG metadata
    assert "tIME" not in png_chunks((run / "curves.png").read_bytes())


def test_curves_are_deterministic_and_need_metrics(world, tmp_path):
    records = rundir.read_metrics(world["run"])
    assert [r["epoch"] for r in records] == [1, 2]
    assert plots.curves_png(records) == plots.curves_png(records)
    path = rundir.write_curves(tmp_path, records)
    assert path == os.path.join(tmp_path, "curves.png")
    assert open_png(open(path, "rb").read()).size == (1300, 750)
    with pytest.raises(CvaeError, match="no per-epoch metrics"):
        rundir.write_curves(tmp_path / "nothing-here")


def test_curves_survive_odd_records():
    records = [{"epoch": 1, "phase": "FAST", "beta": 0.1, "lr": 1e-3, "test_neg_elbo": 300.0},
               {"epoch": 2, "phase": "QUALITY", "beta": 1, "lr": 0.0, "test_neg_elbo": float("nan"),
                "train_rec": None, "test_kl": 3}]
    open_png(plots.curves_png(records))  # missing keys, None, NaN and lr 0: still a picture


def test_pca_2d_matches_the_covariance_eigenvectors():
    rng = np.random.default_rng(3)
    points = rng.standard_normal((500, 5)) * np.array([5.0, 2.0, 1.0, 0.5, 0.1]) + 7.0
    projection, ratio = plots.pca_2d(points)
    centred = points - points.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(centred.T, bias=True))
    top = vectors[:, ::-1][:, :2]
    # Sign convention: each axis's largest loading is positive (SVD's signs are arbitrary).
    top = top * np.sign(top[np.argmax(np.abs(top), axis=0), [0, 1]])
    np.testing.assert_allclose(projection, centred @ top, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ratio, values[::-1][:2] / values.sum(), rtol=1e-7)
    assert ratio[0] > ratio[1] > 0


def test_pca_2d_of_a_one_dimensional_latent():
    projection, ratio = plots.pca_2d(np.arange(6, dtype=float)[:, None])
    assert projection.shape == (6, 2) and not projection[:, 1].any()
    np.testing.assert_allclose(ratio, [1.0, 0.0])


def test_latent_picture_encodes_the_test_set_in_one_batched_call(world, tmp_path, monkeypatch):
    from cvae.data import Dataset
    from cvae.model import model_from_checkpoint

    model, _ = model_from_checkpoint(world["run"] / "last.cvae", threads=1, max_batch=16)
    dataset = Dataset.load(world["data"], "test", DIGITS)
    calls = []
    real = rundir.encode_all
    monkeypatch.setattr(rundir, "encode_all", lambda m, x, y: calls.append(len(y)) or real(m, x, y))
    path = rundir.write_latent(model, dataset, tmp_path)
    assert calls == [len(dataset)]  # the whole set at once; encode_all batches it for the kernels
    image = open_png(open(path, "rb").read())
    assert image.size == (800, 650)
    assert plots.latent_png(real(model, dataset.images, dataset.labels)[0], dataset.labels) == \
        open(path, "rb").read()


def test_cvae_help_does_not_import_matplotlib():
    code = ("import sys\nfrom cvae.cli import main\ncode = main(['--help'])\n"
            "assert code == 0\nprint(sorted(m for m in sys.modules if m.startswith('matplotlib')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- cvae report


class Page(html.parser.HTMLParser):
    """Every tag with its attributes, and the text of <style>."""

    def __init__(self):
        super().__init__()
        self.tags = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def parse(path):
    page = Page()
    page.feed(open(path, encoding="ascii").read())  # pure ASCII: safe to mail
    return page


def assert_self_contained(page):
    """Nothing is loaded from elsewhere: every src/href/srcset/poster/data is a data: URI or
    an in-page anchor, no <script>, <link>, <iframe>, <object>, <embed> or <base>, and the
    style sheet has no url() or @import."""
    anchors = {attrs["id"] for _, attrs in page.tags if "id" in attrs}
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base", "frame"), tag
        for name in ("src", "href", "srcset", "poster", "data", "action", "background"):
            value = attrs.get(name)
            if value is None:
                continue
            if value.startswith("#"):
                assert value[1:] in anchors, f"{name}={value}: no such anchor"
            else:
                assert value.startswith("data:image/png;base64,"), f"<{tag} {name}={value[:60]}>"
        assert not any(k.startswith("on") for k in attrs), f"an event handler in <{tag}>"
    assert "url(" not in page.style and "@import" not in page.style


def images_of(page):
    """[(alt, PIL image, width attribute, height attribute)] of every <img>."""
    import base64

    found = []
    for tag, attrs in page.tags:
        if tag == "img":
            data = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
            found.append((attrs["alt"], open_png(data), int(attrs["width"]), int(attrs["height"])))
    return found


def test_report_is_one_self_contained_page_with_every_picture(world, run_copy, capsys):
    code, out, err = run_cli(capsys, "report", run_copy)
    assert code == 0, err
    path = run_copy / "report.html"
    assert f"-> {path}" in out and "xdg-open" in out
    page = parse(path)
    assert_self_contained(page)
    images = images_of(page)
    sheets = sorted(p.name for p in run_copy.glob("*.pgm"))
    assert sorted(RUN_SHEETS) == sheets
    assert [alt for alt, *_ in images] == ["training curves", "latent means, PCA", *RUN_SHEETS]
    assert f"({len(images)} picture(s))" in out
    for alt, image, width, height in images:
        if alt.endswith(".pgm"):
            pixels = read_pgm(run_copy / alt)
            np.testing.assert_array_equal(np.asarray(image), pixels)  # the sheet itself
            assert (width, height) == (2 * pixels.shape[1], 2 * pixels.shape[0])
        else:
            assert (width, height) == image.size
    assert open_png((run_copy / "curves.png").read_bytes()).size == images[0][1].size
    text = path.read_text()
    for fragment in ("Summary", "class-conditional samples", "cvae eval --checkpoint",
                     "Configuration (config.json)", "test negative ELBO", "2 of 2 epochs (complete)"):
        assert fragment.lower() in html.unescape(text).lower(), fragment
    # The same run directory gives the same page.
    assert run_cli(capsys, "report", run_copy)[0] == 0
    assert path.read_text() == text


def test_report_shows_every_eval_key(run_copy, capsys):
    evaluation = {"neg_elbo": 93.4567, "rec": 70.25, "kl": 23.2, "iwae_nll": 90.125, "k": 100,
                  "ssim": 0.81234, "ssim_per_digit": {str(d): 0.8 + d / 100 for d in DIGITS},
                  "cond_accuracy": None, "cond_accuracy_per_digit": {"0": 0.97, "1": None},
                  "fid": 3.5, "fid_test_floor": 0.25, "temperature": 1.0, "n_images": 16,
                  "a_future_key": "x<y", "seed": 0}
    (run_copy / "eval.json").write_text(json.dumps(evaluation))
    code, out, err = run_cli(capsys, "report", run_copy, "--out", run_copy / "page.html")
    assert code == 0, err
    text = (run_copy / "page.html").read_text()
    assert not (run_copy / "report.html").exists()
    section = html.unescape(text.split('id="metrics"')[1].split("</section>")[0])
    for label in ("negative ELBO", "reconstruction", "KL", "IWAE NLL", "SSIM per digit",
                  "conditional accuracy per digit", "FID floor", "temperature", "a_future_key",
                  "x<y", "93.46", "0.8123", "3.5", "—"):
        assert label in section, label
    assert "x<y" not in text  # escaped in the page
    assert "<th>0</th><th>1</th><th>2</th><th>3</th>" in section  # per digit: a small table
    assert "cvae eval --checkpoint" not in section
    assert_self_contained(parse(run_copy / "page.html"))


def test_report_draws_missing_curves_and_says_latent_is_missing(run_copy, capsys):
    (run_copy / "curves.png").unlink()
    (run_copy / "latent.png").unlink()
    code, out, err = run_cli(capsys, "report", run_copy)
    assert code == 0, err
    assert (run_copy / "curves.png").is_file()  # drawn and kept
    assert not (run_copy / "latent.png").exists()
    text = html.unescape((run_copy / "report.html").read_text())
    assert "No latent picture" in text and "--data DIR" in text
    assert "note: No latent picture" in out
    images = images_of(parse(run_copy / "report.html"))
    assert [alt for alt, *_ in images] == ["training curves", *RUN_SHEETS]


def test_report_draws_the_latent_picture_from_data(world, run_copy, capsys, monkeypatch):
    (run_copy / "latent.png").unlink()
    code, _, err = run_cli(capsys, "report", run_copy, "--data", world["data"], "--threads", 1)
    assert code == 0, err
    assert open_png((run_copy / "latent.png").read_bytes()).size == (800, 650)
    assert "No latent picture" not in (run_copy / "report.html").read_text()
    # $CVAE_DATA is used the same way when --data is not given.
    (run_copy / "latent.png").unlink()
    monkeypatch.setenv("CVAE_DATA", str(world["data"]))
    assert run_cli(capsys, "report", run_copy)[0] == 0
    assert (run_copy / "latent.png").is_file()
    assert len(images_of(parse(run_copy / "report.html"))) == 2 + len(RUN_SHEETS)


def test_report_redraws_stale_curves(run_copy, capsys):
    curves = run_copy / "curves.png"
    curves.write_bytes(png_bytes(np.zeros((5, 5), np.uint8)))
    os.utime(curves, (1, 1))  # older than metrics.jsonl
    assert run_cli(capsys, "report", run_copy)[0] == 0
    assert open_png(curves.read_bytes()).size == (1300, 750)


def test_report_handles_a_latent_picture_older_than_the_checkpoint(world, run_copy, capsys):
    latent = run_copy / "latent.png"
    os.utime(latent, (1, 1))  # the newest checkpoint is newer: the picture may be stale
    assert run_cli(capsys, "report", run_copy)[0] == 0  # no test data: keep it, say so
    text = html.unescape((run_copy / "report.html").read_text())
    assert "may be out of date" in text and "older than the newest checkpoint" in text
    assert len(images_of(parse(run_copy / "report.html"))) == 2 + len(RUN_SHEETS)
    assert os.stat(latent).st_mtime == 1
    assert run_cli(capsys, "report", run_copy, "--data", world["data"])[0] == 0  # redrawn
    assert os.stat(latent).st_mtime > 1
    assert "may be out of date" not in (run_copy / "report.html").read_text()


def test_values_are_formatted_for_people():
    assert report.format_value(None) == "—"
    assert report.format_value(93.4567) == "93.46"
    assert report.format_value(0.812345) == "0.8123"
    assert report.format_value(12345) == "12,345" and report.format_value(100) == "100"
    assert report.format_value([0, 1, 2]) == "0, 1, 2"
    assert report.format_value("<b>") == "&lt;b&gt;"
    per_digit = report.format_value({"1": 0.5, "0": None})
    assert per_digit == ('<table class="mini"><tr><th>0</th><th>1</th></tr><tr><td class="num">'
                         '—</td><td class="num">0.5</td></tr></table>')
    nested = report.format_value({"name": "progressive", "params": {"fast": 0.3}})
    assert "<th>name</th>" in nested and "<th>fast</th>" in nested


def test_report_of_a_run_without_epochs_or_sheets(tmp_path, capsys):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 3, "arch": {"h1": 8}, "argv": ["train"]}))
    code, out, err = run_cli(capsys, "report", run)
    assert code == 0, err
    page = parse(run / "report.html")
    assert_self_contained(page)
    assert images_of(page) == []
    text = html.unescape((run / "report.html").read_text())
    for fragment in ("No eval.json", "No per-epoch metrics", "No training curves",
                     "No latent picture", "No digit sheets", "no epoch finished yet"):
        assert fragment in text, fragment


def test_report_notes_a_damaged_sheet_and_still_writes(run_copy, capsys):
    (run_copy / "samples.pgm").write_bytes(b"P5\n28 28\n255\n" + b"\0" * 10)
    (run_copy / "eval.json").write_text("{not json")
    code, out, err = run_cli(capsys, "report", run_copy)
    assert code == 0, err
    text = html.unescape((run_copy / "report.html").read_text())
    assert "samples.pgm" in text and "truncated" in text
    assert "eval.json is not valid JSON" in text
    assert len(images_of(parse(run_copy / "report.html"))) == 2 + len(RUN_SHEETS) - 1


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or
                  p.name == "report.html")


@pytest.mark.parametrize("case", ["missing", "file", "not-a-run", "out-missing-dir", "out-is-dir",
                                  "out-in-a-file", "data-without-test-files", "threads"])
def test_bad_input_is_one_line_and_exit_2(run_copy, tmp_path, capsys, case):
    plain = tmp_path / "plain"
    plain.mkdir()
    (tmp_path / "a-file").write_text("x")
    argv, fragment = {
        "missing": (["report", tmp_path / "nope"], "does not exist"),
        "file": (["report", tmp_path / "a-file"], "is not a directory"),
        "not-a-run": (["report", plain], "not a run directory"),
        "out-missing-dir": (["report", run_copy, "--out", tmp_path / "no" / "r.html"],
                            "does not exist"),
        "out-is-dir": (["report", run_copy, "--out", plain], "is a directory"),
        "out-in-a-file": (["report", run_copy, "--out", tmp_path / "a-file" / "r.html"],
                          "cannot write"),
        "data-without-test-files": (["report", run_copy, "--data", plain], "no MNIST test files"),
        "threads": (["report", run_copy, "--threads", "0"], "--threads"),
    }[case]
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before  # nothing written
    assert leftovers(plain) == []


def test_an_unwritable_output_is_one_line_and_leaves_nothing(run_copy, capsys):
    # /proc exists but takes no new files, even for root.
    code, _, err = run_cli(capsys, "report", run_copy, "--out", "/proc/cvae-report.html")
    assert_one_line_error(code, err, "/proc/cvae-report.html")
    assert not os.path.exists("/proc/cvae-report.html")
    assert leftovers(run_copy) == []


def test_a_failed_write_keeps_the_old_report_whole(run_copy, capsys, monkeypatch):
    import cvae.atomic

    assert run_cli(capsys, "report", run_copy)[0] == 0
    old = (run_copy / "report.html").read_bytes()
    (run_copy / "eval.json").write_text(json.dumps({"neg_elbo": 1.0}))  # the new page differs

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cvae.atomic.os, "fsync", broken_fsync)
    code, _, err = run_cli(capsys, "report", run_copy)
    assert_one_line_error(code, err, "No space left on device")
    assert (run_copy / "report.html").read_bytes() == old
    assert [p.name for p in run_copy.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- a run with a flow prior


def test_report_shows_both_priors_sample_sheets_side_by_side(flow_copy, capsys):
    (flow_copy / "eval.json").write_text(json.dumps(flow_eval()))
    code, out, err = run_cli(capsys, "report", flow_copy)
    assert code == 0, err
    path = flow_copy / "report.html"
    page = parse(path)
    assert_self_contained(page)
    images = images_of(page)
    assert [alt for alt, *_ in images] == ["training curves", "latent means, PCA", *FLOW_SHEETS]
    for alt, image, *_ in images[2:]:
        np.testing.assert_array_equal(np.asarray(image), read_pgm(flow_copy / alt))
    text = path.read_text()
    pair = text.split('<div class="pair">')[1].split("</div>")[0]
    assert pair.count("<figure>") == 2 and pair.index('alt="samples.pgm"') < pair.index(
        'alt="samples-flow.pgm"')
    pair = text_of(pair)
    assert ("N(0, I) (eval.json, T = 1): conditional accuracy 34.0% (lowest: digit 1, 0.0%); "
            "FID 300.74 (floor 1.379); diversity 10.32 (test digits: 10.23)") in pair
    assert ("flow prior (eval.json, T = 1): conditional accuracy 82.0% (lowest: digit 3, 70.0%); "
            "FID 98.61 (floor 1.379); diversity 4.941 (test digits: 10.23)") in pair
    assert "samples of the flow prior" in pair and "method midpoint" in pair

    metrics = text_of(section(path, "metrics"))
    assert "generated digits by prior metric flow prior (heun, 10 steps) N(0, I)" in metrics
    assert "conditional accuracy 0.82 0.34" in metrics and "FID 98.61 300.74" in metrics
    assert "diversity 4.941 10.32" in metrics and "test digits' diversity 10.23" in metrics
    assert "conditional accuracy (flow prior) 0.82" in metrics  # the top level is the flow's
    assert 'title="by_prior"' not in section(path, "metrics")  # tabulated by prior instead
    summary = text_of(section(path, "summary"))
    assert "flow prior prior.cvae" in summary and "active latent dimensions" in summary
    assert f"trained, {P.DEFAULT_EPOCHS} epochs" in summary
    assert "conditional accuracy (eval.json, T = 1) 0.82 (flow prior), 0.34 (N(0, I))" in summary


def test_report_says_when_the_sheets_have_no_figures(flow_copy, capsys):
    evaluation = flow_eval()
    del evaluation["by_prior"]["flow"]  # evaluated before the prior was trained
    (flow_copy / "eval.json").write_text(json.dumps(evaluation))
    assert run_cli(capsys, "report", flow_copy)[0] == 0
    pair = text_of(section(flow_copy / "report.html", "sheets"))
    assert "flow prior: eval.json has no figures of this prior: run 'cvae eval" in pair
    assert "N(0, I) (eval.json, T = 1): conditional accuracy 34.0%" in pair
    (flow_copy / "eval.json").unlink()
    assert run_cli(capsys, "report", flow_copy)[0] == 0
    pair = text_of(section(flow_copy / "report.html", "sheets"))
    assert pair.count("no figures yet: run 'cvae eval --checkpoint") == 2


def test_report_draws_a_missing_or_stale_flow_sheet(flow_world, flow_copy, capsys, monkeypatch):
    (flow_copy / "samples-flow.pgm").unlink()
    (flow_copy / "samples-flow.json").unlink()
    code, out, err = run_cli(capsys, "report", flow_copy, "--threads", 1)
    assert code == 0, err
    # Drawn as the trainer drew it, and kept.
    assert (flow_copy / "samples-flow.pgm").read_bytes() == (flow_world / "samples-flow.pgm").read_bytes()
    assert json.loads((flow_copy / "samples-flow.json").read_text())["extra"]["prior"] == "flow"
    sheets = text_of(section(flow_copy / "report.html", "sheets"))
    assert ("the run had no samples-flow.pgm: drawn for this page from last.cvae and prior.cvae "
            "and saved as samples-flow.pgm") in sheets
    assert [alt for alt, *_ in images_of(parse(flow_copy / "report.html"))][2:] == FLOW_SHEETS

    os.utime(flow_copy / "samples-flow.pgm", (1, 1))  # older than the prior: redrawn
    assert run_cli(capsys, "report", flow_copy)[0] == 0
    assert os.stat(flow_copy / "samples-flow.pgm").st_mtime > 1
    assert "samples-flow.pgm was older than prior.cvae" in text_of(
        section(flow_copy / "report.html", "sheets"))

    # A run directory it cannot write to: drawn for the page only.
    (flow_copy / "samples-flow.pgm").unlink()
    monkeypatch.setattr(report, "_writable", lambda directory: False)
    assert run_cli(capsys, "report", flow_copy)[0] == 0
    assert not (flow_copy / "samples-flow.pgm").exists()
    images = images_of(parse(flow_copy / "report.html"))
    assert [alt for alt, *_ in images][2:] == FLOW_SHEETS
    np.testing.assert_array_equal(np.asarray(images[3][1]), read_pgm(flow_world / "samples-flow.pgm"))
    assert "not writable, so it was not saved" in text_of(section(flow_copy / "report.html", "sheets"))


def test_report_of_a_prior_it_cannot_use(flow_copy, capsys):
    (flow_copy / "samples-flow.pgm").unlink()
    (flow_copy / "prior.cvae").write_bytes(b"not a checkpoint")
    code, out, err = run_cli(capsys, "report", flow_copy)
    assert code == 0, err
    text = text_of((flow_copy / "report.html").read_text())
    assert "No flow prior sheet: the run had no samples-flow.pgm, and drawing it failed" in text
    assert "note: No flow prior sheet" in out
    assert [alt for alt, *_ in images_of(parse(flow_copy / "report.html"))][2:] == RUN_SHEETS


def test_a_run_without_a_prior_looks_as_before_with_a_new_eval_json(run_copy, capsys):
    evaluation = flow_eval()
    gaussian = evaluation["by_prior"]["gaussian"]
    evaluation.update({k: gaussian[k] for k in gaussian}, prior="gaussian",
                      prior_settings={"prior": "gaussian"}, by_prior={"gaussian": gaussian})
    (run_copy / "eval.json").write_text(json.dumps(evaluation))
    assert run_cli(capsys, "report", run_copy)[0] == 0
    text = (run_copy / "report.html").read_text()
    assert 'class="pair"' not in text and "by prior" not in text_of(text)
    assert 'title="by_prior"' not in text and "flow prior" not in text_of(section(
        run_copy / "report.html", "summary"))
    assert "conditional accuracy 0.34" in text_of(section(run_copy / "report.html", "metrics"))
    assert [alt for alt, *_ in images_of(parse(run_copy / "report.html"))][2:] == RUN_SHEETS


def test_report_help_says_how_to_open_it(capsys):
    code, out, _ = run_cli(capsys, "report", "--help")
    assert code == 0
    assert "xdg-open RUN_DIR/report.html" in out and "self-contained" in out and "mailed" in out


# ---------------------------------------------------------------- in a real browser


PROBE = """<script>
window.addEventListener("load", function () {
  var found = Array.prototype.map.call(document.images, function (img) {
    var box = img.getBoundingClientRect();
    return {alt: img.alt, complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight, top: box.top, left: box.left};
  });
  var loaded = performance.getEntriesByType("resource").map(function (r) { return r.name; });
  // Whatever reaches past the window's right edge (a table too wide for the page).
  var overflow = Array.prototype.filter.call(document.querySelectorAll("table, figure, p"),
    function (el) { return el.getBoundingClientRect().right > window.innerWidth + 1; })
    .map(function (el) { return el.tagName + ": " + el.textContent.slice(0, 80); });
  if (document.documentElement.scrollWidth > window.innerWidth) {
    overflow.push("page: " + document.documentElement.scrollWidth + " px wide");
  }
  var pre = document.createElement("pre");
  pre.id = "cvae-probe";
  pre.textContent = JSON.stringify({images: found, resources: loaded, overflow: overflow});
  document.body.appendChild(pre);
});
</script>
"""


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(run_copy, tmp_path, capsys):
    seen = render_in_chromium(run_copy, tmp_path, capsys)
    assert len(seen) == 2 + len(RUN_SHEETS)


def test_report_with_a_flow_prior_renders_in_headless_chromium(flow_copy, tmp_path, capsys):
    # Ten digits' figures per prior: the widest tables the page has (they must fit 1280 px).
    (flow_copy / "eval.json").write_text(json.dumps(flow_eval(digits=range(10))))
    seen = {img["alt"]: img for img in render_in_chromium(flow_copy, tmp_path, capsys)}
    assert list(seen) == ["training curves", "latent means, PCA", *FLOW_SHEETS]
    gaussian, flow = seen["samples.pgm"], seen["samples-flow.pgm"]
    assert gaussian["top"] == flow["top"] and gaussian["left"] < flow["left"]  # side by side


def render_in_chromium(run_dir, tmp_path, capsys):
    """Open the run's report in headless chromium: every <img> decoded, nothing fetched.
    Returns the images as the browser saw them (alt, size, place)."""
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: CI must run the browser test "
                        "(.ci/run installs chromium with apt-get)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI runs this "
                    "test")
    assert run_cli(capsys, "report", run_dir)[0] == 0
    page = (run_dir / "report.html").read_text()
    expected = [alt for alt, *_ in images_of(parse(run_dir / "report.html"))]
    probe_dir = tmp_path / "browser"
    probe_dir.mkdir()
    probe = probe_dir / "report-probe.html"
    assert page.count("</body>") == 1
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", "--disable-background-networking",
               "--window-size=1280,1024",
               f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
               probe.as_uri()]
    env = dict(os.environ, HOME=str(tmp_path))
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r'<pre id="cvae-probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the probe did not run; stderr:\n{result.stderr[-3000:]}"
    seen = json.loads(html.unescape(match.group(1)))
    assert [img["alt"] for img in seen["images"]] == expected
    for img in seen["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
    assert seen["resources"] == []  # no fetch (data: and file: URIs are not listed; http is)
    assert seen["overflow"] == []  # everything fits a 1280-pixel-wide window
    return seen["images"]
