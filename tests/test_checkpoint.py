import hashlib
import json
import os
import pickle
import resource
import signal
import struct

import numpy as np
import pytest

import cvae
from cvae import checkpoint
from cvae.checkpoint import (
    MAGIC,
    epoch_checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)
from cvae.errors import CvaeError


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


def leftover_temp_files(directory):
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


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
    base = {"kind": KIND, "dtype": "float32", "meta": {}}
    section = {"name": "w", "shape": [4], "offset": 0, "nbytes": 16}
    yield "wrong dtype", forge({**base, "dtype": "float64", "sections": []}), "unsupported dtype"
    yield "section past end", forge({**base, "sections": [section]}, bytes(8)), "extends past the end"
    yield "size mismatch", forge({**base, "sections": [{**section, "nbytes": 12}]}, bytes(16)), "needs 16"
    yield "negative dim", forge({**base, "sections": [{**section, "shape": [-4]}]}, bytes(16)), "bad shape"
    yield "unaligned", forge({**base, "sections": [{**section, "offset": 4}]}, bytes(20)), "bad offset"
    yield "overlap", forge({**base, "sections": [section, {**section, "name": "v", "shape": [20], "nbytes": 80}]},
                           bytes(80)), "overlap"
    yield "duplicate name", forge({**base, "sections": [section, {**section, "offset": 64}]}, bytes(80)), "duplicate"
    yield "extra data", forge({**base, "sections": [section]}, bytes(200)), "header describes"


def test_every_corruption_is_a_clear_error_naming_the_file(saved, tmp_path):
    good = saved.read_bytes()
    cases = list(corruptions(good))
    assert len(cases) == 25
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
