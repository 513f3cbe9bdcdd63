import hashlib
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

import cvae
from cvae import checkpoint
from cvae.checkpoint import MAGIC, load_checkpoint, save_checkpoint
from cvae.rundir import (epoch_checkpoint_path, latest_checkpoint, list_checkpoints,
                         save_run_checkpoint)
from cvae.errors import CvaeError

from .conftest import image_idx, label_idx, leftover_temp_files


# These tests are about the container format, so their files are of a kind with no
# architecture to check (see KIND_CHECKS; the kinds cvae builds are tested further down).
KIND = "container"


def sample_sections():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((12, 9)).astype(np.float32)
    return {
        "enc.w": rng.standard_normal((794, 40)).astype(np.float32),
        "enc.b": np.zeros(40, dtype=np.float32),
        "scalar": np.float32(1.5),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "strided": base[::2, 1::3].T,  # non-contiguous view
        "fortran": np.asfortranarray(rng.standard_normal((5, 7)).astype(np.float32)),
        "cube": rng.standard_normal((2, 3, 4)).astype(np.float32),
    }


SAMPLE_META = {"architecture": {"latent": 20, "hidden": [400]}, "digits": list(range(10)), "epoch": 3,
               "step": 1406, "rng": {"state": 2**100 + 7, "inc": 12345}, "schedule": {"name": "cosine", "t": 0.3}}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.cvae"
    save_checkpoint(path, KIND, SAMPLE_META, sample_sections())
    return path


def reseal(data):
    """Recompute the trailing SHA-256 so structural checks past the checksum get exercised."""
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


def forge(header, payload=b"", version=1):
    """A checksum-valid file around an arbitrary header, as a buggy or hostile writer would make."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    head = struct.pack("<8sIQ", MAGIC, version, len(header_bytes)) + header_bytes
    head += bytes(-len(head) % 64)
    return reseal(head + payload + bytes(32))


def test_round_trip_preserves_meta_shapes_and_values(saved):
    meta, sections, header = load_checkpoint(saved, expected_kind=KIND)
    assert meta == SAMPLE_META
    expected = sample_sections()
    assert list(sections) == sorted(expected)
    for name, array in expected.items():
        assert sections[name].dtype == np.float32
        assert sections[name].shape == np.shape(array), name
        np.testing.assert_array_equal(sections[name], array)
    assert header["kind"] == KIND and header["dtype"] == "float32"
    assert header["cvae_version"] == cvae.__version__


def test_loaded_arrays_are_writable_and_independent(saved):
    _, sections, _ = load_checkpoint(saved)
    sections["enc.b"][:] = 7
    sections["enc.w"] += 1
    assert (sections["enc.b"] == 7).all()
    np.testing.assert_array_equal(sections["enc.w"], sample_sections()["enc.w"] + 1)


def test_file_layout_matches_the_spec(saved):
    data = saved.read_bytes()
    magic, version, header_length = struct.unpack_from("<8sIQ", data)
    assert (magic, version) == (b"CVAECKPT", 1)
    header = json.loads(data[20:20 + header_length].decode("utf-8"))
    data_start = -(-(20 + header_length) // 64) * 64
    assert not any(data[20 + header_length:data_start])
    for entry in header["sections"]:
        assert entry["offset"] % 64 == 0
        start = data_start + entry["offset"]
        stored = np.frombuffer(data[start:start + entry["nbytes"]], dtype="<f4")
        np.testing.assert_array_equal(stored.reshape(entry["shape"]), sample_sections()[entry["name"]])
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    # Sorted keys, compact: the header text is canonical.
    assert data[20:20 + header_length] == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def test_identical_input_gives_identical_bytes(tmp_path):
    sections = sample_sections()
    reordered = dict(reversed(list(sections.items())))
    meta_reordered = dict(reversed(list(SAMPLE_META.items())))
    save_checkpoint(tmp_path / "a.cvae", KIND, SAMPLE_META, sections)
    save_checkpoint(tmp_path / "b.cvae", KIND, meta_reordered, reordered)
    assert (tmp_path / "a.cvae").read_bytes() == (tmp_path / "b.cvae").read_bytes()


def test_wider_floats_and_numpy_meta_values_are_converted(tmp_path):
    weights = np.arange(6, dtype=np.float64).reshape(2, 3)
    meta = {"seed": np.int64(5), "lr": np.float32(0.5), "mt": np.arange(3, dtype=np.uint32)}
    save_checkpoint(tmp_path / "c.cvae", KIND, meta, {"w": weights})
    meta_back, sections, _ = load_checkpoint(tmp_path / "c.cvae", expected_kind=KIND)
    assert meta_back == {"seed": 5, "lr": 0.5, "mt": [0, 1, 2]}
    np.testing.assert_array_equal(sections["w"], weights)


def test_chunked_streaming_of_non_contiguous_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 64)
    big = np.arange(40 * 30, dtype=np.float64).reshape(40, 30)[:, ::2].T
    save_checkpoint(tmp_path / "s.cvae", KIND, {}, {"big": big, "col": big[:, 3]})
    _, sections, _ = load_checkpoint(tmp_path / "s.cvae")
    np.testing.assert_array_equal(sections["big"], big)
    np.testing.assert_array_equal(sections["col"], big[:, 3])


def test_caller_mistakes_are_programming_errors(tmp_path):
    with pytest.raises(ValueError, match="float"):
        save_checkpoint(tmp_path / "x.cvae", KIND, {}, {"ids": np.arange(3)})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "x.cvae", KIND, {"f": object()}, {})
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint(tmp_path / "x.cvae", "", {}, {})
    assert os.listdir(tmp_path) == []


def flip(data, position):
    data = bytearray(data)
    data[position] ^= 0x01
    return bytes(data)


def corruptions(good):
    header_length = struct.unpack_from("<Q", good, 12)[0]
    yield "data byte flipped", flip(good, len(good) - 100), "damaged: checksum mismatch"
    yield "header byte flipped", flip(good, 40), "damaged: checksum mismatch"
    yield "checksum byte flipped", flip(good, len(good) - 1), "damaged: checksum mismatch"
    yield "truncated in data", good[:len(good) // 2], r"damaged: checksum mismatch; truncated"
    yield "truncated checksum", good[:-5], "damaged: checksum mismatch; truncated"
    yield "truncated in header", good[:30 + header_length // 2], "damaged: header length"
    yield "truncated in prefix", good[:15], "damaged: truncated"
    yield "trailing garbage", good + b"\0" * 10, "damaged: checksum mismatch; has extra bytes"
    yield "wrong magic", b"CVAECKPX" + good[8:], "not a cvae checkpoint"
    yield "empty", b"", "not a cvae checkpoint"
    yield "text file", b"hello\n", "not a cvae checkpoint"
    yield "huge header length", good[:12] + struct.pack("<Q", 2**63) + good[20:], "header length 9223372036854775808"
    yield "newer version", good[:8] + struct.pack("<I", 2) + good[12:], "newer cvae.*format 2"
    yield "version zero", good[:8] + struct.pack("<I", 0) + good[12:], "damaged: invalid checkpoint format version 0"
    # The checksum is valid in these; the structure checks behind it must still hold.
    yield "bad JSON", forge(b"{not json"), "damaged: header is not valid JSON"
    yield "non-UTF-8 header", forge(b'{"a": "\xff"}'), "damaged: header is not valid JSON"
    yield "header not an object", forge(b"[1, 2]"), "damaged: header lacks"
    yield "deeply nested header", forge(b"[" * 100000 + b"]" * 100000), "nested too deeply"
    yield "NaN in the header", forge(b'{"meta": {"lr": NaN}}'), "header holds a non-finite number NaN"
    yield "1e999 in the header", forge(b'{"meta": {"lr": 1e999}}'), "non-finite number 1e999"
    base = {"kind": KIND, "dtype": "float32", "meta": {}}
    section = {"name": "w", "shape": [4], "offset": 0, "nbytes": 16}
    yield "wrong dtype", forge({**base, "dtype": "float64", "sections": []}), "unsupported dtype"
    yield "section past end", forge({**base, "sections": [section]}, bytes(8)), "extends past the end"
    yield "size mismatch", forge({**base, "sections": [{**section, "nbytes": 12}]}, bytes(16)), "needs 16"
    yield "negative dim", forge({**base, "sections": [{**section, "shape": [-4]}]}, bytes(16)), "bad shape"
    # More dimensions than numpy builds (its ValueError, once)
    yield "65 dims", forge({**base, "sections": [{**section, "shape": [4] + [1] * 64}]}, bytes(16)), "bad shape"
    yield "unaligned", forge({**base, "sections": [{**section, "offset": 4}]}, bytes(20)), "bad offset"
    yield "overlap", forge({**base, "sections": [section, {**section, "name": "v", "shape": [20], "nbytes": 80}]},
                           bytes(80)), "overlap"
    yield "duplicate name", forge({**base, "sections": [section, {**section, "offset": 64}]}, bytes(80)), "duplicate"
    yield "extra data", forge({**base, "sections": [section]}, bytes(200)), "header describes"


def test_every_corruption_is_a_clear_error_naming_the_file(saved, tmp_path):
    good = saved.read_bytes()
    cases = list(corruptions(good))
    assert len(cases) == 29
    for name, data, message in cases:
        path = tmp_path / f"{name.replace(' ', '_')}.cvae"
        path.write_bytes(data)
        with pytest.raises(CvaeError, match=message) as caught:
            load_checkpoint(path)
        assert str(path) in str(caught.value), name
        assert "\n" not in str(caught.value)


def test_a_pickle_is_rejected_without_being_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.cvae"
    path.write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(CvaeError, match="is not a cvae checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_kind_mismatch(saved):
    with pytest.raises(CvaeError, match="is a 'container' checkpoint, not a 'classifier' checkpoint"):
        load_checkpoint(saved, expected_kind="classifier")


def test_unreadable_paths(tmp_path):
    with pytest.raises(CvaeError, match="cannot read checkpoint .*missing.cvae"):
        load_checkpoint(tmp_path / "missing.cvae")
    with pytest.raises(CvaeError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)


def test_failure_midway_keeps_the_previous_checkpoint(saved, monkeypatch):
    previous = saved.read_bytes()
    real_write_section = checkpoint._write_section
    calls = []

    def fail_on_third_section(writer, array):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while converting an array")
        real_write_section(writer, array)

    monkeypatch.setattr(checkpoint, "_write_section", fail_on_third_section)
    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(saved, KIND, {"epoch": 4}, sample_sections())
    assert saved.read_bytes() == previous
    assert leftover_temp_files(saved.parent) == []


def test_disk_full_midway_keeps_the_previous_checkpoint(saved):
    previous = saved.read_bytes()
    big = {"w": np.ones((512, 512), dtype=np.float32)}  # 1 MiB, past the limit below
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(CvaeError, match="cannot write checkpoint .*model.cvae: File too large"):
            save_checkpoint(saved, KIND, {}, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert saved.read_bytes() == previous
    assert leftover_temp_files(saved.parent) == []


def test_run_directory_naming_and_latest(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert list_checkpoints(run) == [] and latest_checkpoint(run) is None
    sections = {"w": np.ones(3, dtype=np.float32)}
    for epoch in (1, 2, 10000):
        last = save_run_checkpoint(run, KIND, {"epoch": epoch}, sections, epoch=epoch)
        assert last == str(run / "last.cvae")
        assert (run / "last.cvae").read_bytes() == open(epoch_checkpoint_path(run, epoch), "rb").read()
    save_run_checkpoint(run, KIND, {"epoch": 10000, "step": 5}, sections)  # mid-epoch: last only
    (run / "notes.txt").write_text("ignored")
    (run / ".last.cvae.abc.tmp").write_bytes(b"")
    (run / "best.cvae").write_bytes(b"")
    names = [os.path.basename(p) for p in list_checkpoints(run)]
    assert names == ["epoch-0001.cvae", "epoch-0002.cvae", "epoch-10000.cvae", "best.cvae", "last.cvae"]
    assert latest_checkpoint(run) == str(run / "last.cvae")
    assert load_checkpoint(latest_checkpoint(run))[0] == {"epoch": 10000, "step": 5}
    assert load_checkpoint(epoch_checkpoint_path(run, 10000))[0] == {"epoch": 10000}
    os.unlink(run / "last.cvae")
    assert latest_checkpoint(run) == str(run / "epoch-10000.cvae")


def test_missing_run_directory(tmp_path):
    with pytest.raises(CvaeError, match="does not exist"):
        list_checkpoints(tmp_path / "nope")
    with pytest.raises(CvaeError, match="does not exist"):
        latest_checkpoint(tmp_path / "nope")


def test_written_files_get_the_usual_permissions(tmp_path):
    from cvae.atomic import write_bytes_atomic

    umask = os.umask(0o022)
    try:
        path = tmp_path / "x.bin"
        write_bytes_atomic(path, b"abc")
        assert (path.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(umask)


def test_a_checkpoint_with_no_sections_reads_back(tmp_path):
    save_checkpoint(tmp_path / "empty.cvae", KIND, {"note": "no arrays"}, {})
    meta, sections, _ = load_checkpoint(tmp_path / "empty.cvae")
    assert meta == {"note": "no arrays"} and sections == {}


# ---------------------------------------------------------------- validation, through the real CLI
#
# Files with a correct SHA-256 (written by save_checkpoint) whose content is poisoned: every
# command that reads one must stop with one `cvae: error:` line and exit 2, before writing
# anything. Run as `python -m cvae` in a subprocess: what a user sees, traceback or not.


TINY = {"h1": 4, "h2": 3, "latent": 2, "act": "elu"}


def training_meta(**changes):
    from cvae.model import Arch
    from cvae.schedule import make_schedule
    from cvae.train import Plan

    plan = Plan(arch=Arch(**TINY), digits=(0, 1), schedule=make_schedule("progressive", 1e-3),
                epochs=2, seed=0, batch=8, lr=1e-3,
                data={"name": "MNIST", "train_images": 16, "test_images": 16},
                epoch=1, step=2)
    return {**plan.meta(adam_t=2), **changes}


def cvae_sections(poison=None, optimizer=True):
    from cvae.model import Arch, Model

    model = Model(Arch(**TINY), max_batch=8)
    model.init_params(0)
    model.adam_v["dec1.W"][...] = 1e-4  # as after a few steps
    sections = model.state_sections(optimizer=optimizer)
    if poison:
        name, value = poison
        sections[name][0, 0] = value
    return model, sections


@pytest.fixture
def world(tmp_path):
    """A tiny run (last.cvae with Adam state and its position), its data, an empty out/."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 8, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (data / f"{prefix}-images-idx3-ubyte").write_bytes(
            image_idx(rng.integers(0, 256, (16, 784), dtype=np.uint8)))
        (data / f"{prefix}-labels-idx1-ubyte").write_bytes(label_idx(labels))
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "out").mkdir()
    return {"root": tmp_path, "run": run, "data": data, "out": tmp_path / "out"}


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(world, args, *fragments):
    """`cvae args` exits 2 with one `cvae: error:` line holding every fragment, no traceback,
    and writes nothing anywhere under the world's root."""
    before = snapshot(world["root"])
    env = {**os.environ, "CVAE_CACHE": str(world["root"] / "cache")}
    env.pop("CVAE_DATA", None)
    done = subprocess.run([sys.executable, "-m", "cvae", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("cvae: error: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == "", done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(world["root"]) == before, "a refused command wrote or changed a file"
    return lines[0]


def reading_commands(world, target):
    """Every command that reads a CVAE checkpoint, each with where it would write."""
    out, data = world["out"], world["data"]
    return [["generate", "--checkpoint", target, "--out", out / "g.pgm", "--prior", "gaussian"],
            ["reconstruct", "--checkpoint", target, "--data", data, "--out", out / "r.pgm"],
            ["interpolate", "--checkpoint", target, "--out", out / "i.pgm"],
            ["eval", "--checkpoint", target, "--data", data, "--k", "1", "--samples", "4"],
            ["prior", "train", "--checkpoint", world["run"], "--data", data, "--epochs", "1",
             "--quiet"],
            ["train", "--resume", world["run"], "--data", data, "--quiet"]]


def test_nan_weights_behind_a_correct_checksum_stop_every_command(world):
    _, sections = cvae_sections(poison=("param.dec3.W", np.nan))
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(), sections)
    for args in reading_commands(world, world["run"] / "last.cvae"):
        line = assert_refused(world, args, "last.cvae is damaged", "'param.dec3.W'", "nan")
        assert "finite" in line


def test_the_report_names_a_poisoned_checkpoint_instead_of_drawing_from_it(world):
    """`cvae report` builds its page from whatever the run still has, so a damaged checkpoint
    is a note on the page (with the loader's message), not a failure and not a figure."""
    _, sections = cvae_sections(poison=("param.dec3.W", np.nan))
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(), sections)
    page = world["out"] / "report.html"
    done = subprocess.run([sys.executable, "-m", "cvae", "report", world["run"], "--data",
                           world["data"], "--out", page], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    html = page.read_text()
    assert "last.cvae is damaged: section &#x27;param.dec3.W&#x27; holds nan" in html \
        or "last.cvae is damaged: section 'param.dec3.W' holds nan" in html


def test_inf_in_adam_state_stops_resume(world):
    _, sections = cvae_sections(poison=("adam_m.enc1.W", np.inf))
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(), sections)
    assert_refused(world, ["train", "--resume", world["run"], "--data", world["data"]],
                   "'adam_m.enc1.W'", "inf")


def test_negative_adam_second_moments_stop_resume(world):
    _, sections = cvae_sections(poison=("adam_v.dec1.W", -1.0))
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(), sections)
    assert_refused(world, ["train", "--resume", world["run"], "--data", world["data"]],
                   "second moments", "negative")


def test_nan_in_the_header_stops_resume(world):
    _, sections = cvae_sections()
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(lr=float("nan")), sections)
    assert_refused(world, ["train", "--resume", world["run"], "--data", world["data"]],
                   "header holds a non-finite number NaN")


@pytest.mark.parametrize("arch, fragment", [
    ({**TINY, "h1": 10**9}, "not one cvae can build"),      # huge, no sections to match
    ({**TINY, "h1": 8}, "'param.enc1.W' is [4, 794], but the architecture its header declares needs [8, 794]"),
    ({**TINY, "latent": 1.5}, "not one cvae can build"),
    ({**TINY, "act": "tanh"}, "not one cvae can build"),
])
def test_a_header_architecture_that_does_not_fit_stops_generate(world, arch, fragment):
    _, sections = cvae_sections()
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(arch=arch), sections)
    assert_refused(world, reading_commands(world, world["run"])[0], fragment)


@pytest.mark.parametrize("data", [[["train_images", 16]], {"train_images": "16"}])
def test_a_malformed_data_description_stops_prior_train(world, data):
    _, sections = cvae_sections()
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(data=data), sections)
    assert_refused(world, ["prior", "train", "--checkpoint", world["run"], "--data",
                           world["data"], "--epochs", "1", "--quiet"], "last.cvae is damaged")


def test_a_huge_training_batch_stops_resume_before_any_allocation(world):
    _, sections = cvae_sections()
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(batch=10**9), sections)
    assert_refused(world, ["train", "--resume", world["run"], "--data", world["data"]],
                   "'batch'", "not an integer in [1, 65536]")


@pytest.mark.parametrize("digits", [[0, 12], [], [1, 1], [0, True], [-1]])
def test_digits_out_of_range_stop_generate(world, digits):
    _, sections = cvae_sections(optimizer=False)
    save_checkpoint(world["run"] / "last.cvae", "cvae", {"arch": TINY, "digits": digits},
                    sections)
    assert_refused(world, reading_commands(world, world["run"])[0], "are not distinct digits 0-9")


def prior_file(world, arch=None, poison=None):
    """A complete prior.cvae for the world's CVAE (written next to it)."""
    from cvae.model import Arch, Model
    from cvae.prior import FlowPrior, PriorArch, cvae_digest
    from cvae.train_prior import PriorPlan

    model, sections = cvae_sections()
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(), sections)
    model = Model(Arch(**TINY))
    model.load_state_sections(sections)
    prior_arch = PriorArch(latent=2, hidden=4, blocks=1, n_freq=1)
    prior = FlowPrior(prior_arch, max_batch=8)
    prior.init_params(0)
    prior_sections = prior.state_sections()
    if poison:
        prior_sections[poison][0] = np.nan
    plan = PriorPlan(arch=prior_arch, cvae_sha256=cvae_digest(model), cvae_checkpoint="last.cvae",
                     epochs=1, batch=8, lr=1e-3, drop=0.1, seed=0, step=2, complete=True)
    meta = plan.meta(2, [1.0])
    if arch is not None:
        meta["arch"] = {**meta["arch"], **arch}
    save_checkpoint(world["run"] / "prior.cvae", "prior", meta, prior_sections)


@pytest.mark.parametrize("arch, fragment", [
    ({"hidden": 10**9}, "not one cvae can build"),
    ({"latent": 10**9, "dims": None}, "not one cvae can build"),
    ({"dims": [0, 40000]}, "not one cvae can build"),
    ({"blocks": 2}, "lacks section 'param.res2a.W'"),
])
def test_a_prior_header_asking_for_another_network_stops_every_command(world, arch, fragment):
    prior_file(world, arch=arch)
    for args in (["generate", "--checkpoint", world["run"], "--out", world["out"] / "g.pgm"],
                 ["eval", "--checkpoint", world["run"], "--data", world["data"], "--k", "1",
                  "--samples", "4"],
                 ["prior", "train", "--checkpoint", world["run"], "--data", world["data"],
                  "--resume", "--quiet"]):
        assert_refused(world, args, "prior.cvae", fragment)


def test_nan_in_a_prior_stops_generate(world):
    prior_file(world, poison="param.out.b")
    assert_refused(world, ["generate", "--checkpoint", world["run"], "--prior", "flow",
                           "--out", world["out"] / "g.pgm"], "prior.cvae is damaged", "nan")


def test_wrong_kinds_stop_commands(world):
    prior_file(world)
    assert_refused(world, ["generate", "--checkpoint", world["run"] / "prior.cvae",
                           "--out", world["out"] / "g.pgm"], "is a 'prior' checkpoint, not a 'cvae'")
    assert_refused(world, ["classifier", "eval", "--classifier", world["run"] / "last.cvae",
                           "--data", world["data"]], "is a 'cvae' checkpoint, not a 'classifier'")
    assert_refused(world, ["eval", "--checkpoint", world["run"], "--data", world["data"],
                           "--classifier", world["run"] / "prior.cvae"],
                   "is a 'prior' checkpoint, not a 'classifier'")


@pytest.mark.parametrize("arch, poison, fragment", [
    ({"h1": 10**9, "h2": 3, "act": "relu"}, None, "not one cvae can build"),
    ({"h1": 4, "h2": 3, "act": "relu"}, "param.fc3.b", "'param.fc3.b' holds nan"),
])
def test_a_damaged_classifier_stops_classifier_eval(world, arch, poison, fragment):
    from cvae.classifier import ClassifierArch, DigitClassifier

    model = DigitClassifier(ClassifierArch(h1=4, h2=3), max_batch=8)
    model.init_params(0)
    sections = model.state_sections(optimizer=False)
    if poison:
        sections[poison][0] = np.nan
    path = world["out"] / "classifier.cvae"
    save_checkpoint(path, "classifier", {"arch": arch}, sections)
    assert_refused(world, ["classifier", "eval", "--classifier", path, "--data", world["data"]],
                   "classifier.cvae", fragment)


def test_finite_weights_too_large_for_float32_are_refused_when_decoding(world):
    """Weights of 1e29 are finite, so the file passes, but they overflow float32 on the way to
    the pixels: generate says so instead of writing a sheet of NaN."""
    _, sections = cvae_sections(optimizer=False)
    for name in sections:
        sections[name] *= 1e30  # mixed signs: inf - inf is NaN
    save_checkpoint(world["run"] / "last.cvae", "cvae", {"arch": TINY, "digits": [0, 1]},
                    sections)
    assert_refused(world, reading_commands(world, world["run"])[0], "non-finite pixels")


def test_a_valid_tiny_run_is_accepted(world):
    """The same world unpoisoned: generate writes its sheet (so the refusals above are the
    poison's doing, not the world's)."""
    _, sections = cvae_sections()
    save_checkpoint(world["run"] / "last.cvae", "cvae", training_meta(), sections)
    args = reading_commands(world, world["run"])[0]
    done = subprocess.run([sys.executable, "-m", "cvae", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (world["out"] / "g.pgm").exists()


@pytest.mark.parametrize("changes, fragment", [
    ({"lr": "nan"}, "'lr' in its header is 'nan', not numbers"),  # float("nan") would take it
    ({"epoch_losses": [1.0, "inf"]}, "'epoch_losses'"),
    ({"drop": 1.0}, "inconsistent prior training settings"),
    ({"batch": 2**40}, "'batch'"),
    ({"seed": -1}, "'seed'"),
])
def test_a_prior_header_with_bad_settings_is_refused_on_load(world, changes, fragment):
    from cvae.prior import KIND

    prior_file(world)
    path = world["run"] / "prior.cvae"
    meta, sections, _ = load_checkpoint(path, expected_kind=KIND)
    save_checkpoint(path, KIND, {**meta, **changes}, sections)
    with pytest.raises(CvaeError, match=fragment):
        load_checkpoint(path)


def test_creating_a_network_beyond_the_bounds_is_the_same_clear_error_as_loading_one():
    """The bounds a checkpoint is held to are the ones every network is built under, so
    whatever cvae can create it can load again."""
    from cvae.model import MAX_BATCH, MAX_WIDTH, Arch, Model

    with pytest.raises(CvaeError, match=f"a batch of {MAX_BATCH + 1} is beyond the {MAX_BATCH}"):
        Model(Arch(**{**TINY, "act": "elu"}), max_batch=MAX_BATCH + 1)
    with pytest.raises(CvaeError, match=f"layer enc3 would be 3x{MAX_WIDTH + 2}, beyond"):
        Model(Arch(h1=4, h2=3, latent=MAX_WIDTH // 2 + 1), max_batch=8)
