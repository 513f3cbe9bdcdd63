"""The one-file `cvae` binary (packaging/) runs on any x86-64 Linux: no Python, no libc needed.

Builds dist/cvae with packaging/build.sh (a no-op when dist/cvae.stamp matches the sources)
and runs it in three roots:
- a `debootstrap --variant=minbase bookworm` root (packaging/make_chroot.sh, cached in
  ~/.cache/cvae-ci/bookworm-minbase; the mirror comes from this machine's apt sources), the
  full tour: --help, --version, a short training run on a tiny IDX set, generate /
  reconstruct / interpolate, the run's pictures and `cvae report` (matplotlib inside), eval,
  the flow prior (`cvae prior train`, then generate and eval with it), a sweep, --threads 1 vs 2
  giving byte-identical checkpoints and priors, the bundled libgomp, SIGTERM;
- an EMPTY root: nothing but the binary, the data, /proc and /tmp (no libc, no loader, no
  shell), and
- a `debootstrap --variant=minbase bullseye` root (Debian 11, glibc 2.31: older than the
  2.35/2.36 the bundled libpython and libstdc++ were linked against),
  each: --help, a short train (--threads 1 and 2, byte-identical), generate, eval, prior train.

Needs root (debootstrap, chroot, mount), x86-64 Linux, gcc and network access to the package
index and the Debian mirror. Marked `binary`: deselect with `pytest -m "not binary"`.
Each command runs in its own mount namespace (`unshare --mount`) with /proc mounted inside
it, so nothing stays mounted on the host even if the test is killed; the environment is
emptied and the root entered from the host side (`env -i`, `unshare --root`), because the
empty root has no `env` or shell of its own.
"""

import gzip
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import write_split

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
BINARY = REPO / "dist" / "cvae"
IN_ROOT = "/cvae-test"  # the test's directory inside the root
ROOT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"  # the host's, run after `env -i`

pytestmark = [
    pytest.mark.binary,
    pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                       reason="the binary is built for x86-64 Linux"),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root"),
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def binary():
    """dist/cvae, built (or found up to date) by packaging/build.sh."""
    start = time.monotonic()
    env = dict(os.environ, PYTHON=sys.executable)
    for name in ("PYTHONPATH", "CVAE_DIST_DIR"):
        env.pop(name, None)
    result = subprocess.run([str(PACKAGING / "build.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=40 * 60)
    print(f"\nbuild.sh: {time.monotonic() - start:.0f} s\n{result.stdout[-3000:]}")
    assert result.returncode == 0, f"packaging/build.sh failed:\n{result.stdout[-6000:]}"
    assert BINARY.is_file() and os.access(BINARY, os.X_OK)
    return BINARY


@pytest.fixture(scope="module")
def root(binary):
    """The Debian root, with the binary in /usr/local/bin and a fresh /cvae-test holding
    a tiny IDX data set. Held under a lock: test sessions sharing the cached root queue."""
    import fcntl

    start = time.monotonic()
    result = subprocess.run([str(PACKAGING / "make_chroot.sh")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, timeout=30 * 60)
    print(f"\nmake_chroot.sh: {time.monotonic() - start:.0f} s\n{result.stderr[-2000:]}")
    assert result.returncode == 0, f"packaging/make_chroot.sh failed:\n{result.stderr[-4000:]}"
    path = Path(result.stdout.strip().splitlines()[-1])
    assert (path / "bin" / "sh").exists()

    lock = open(f"{path}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        shutil.copy2(binary, path / "usr" / "local" / "bin" / "cvae")
        work = path / IN_ROOT.lstrip("/")
        shutil.rmtree(work, ignore_errors=True)
        (work / "tmp").mkdir(parents=True)
        write_tiny_mnist(work / "data")
        yield path
        shutil.rmtree(work, ignore_errors=True)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def in_root(root, *args, env=None, timeout=600, check=True, popen=False):
    """Run a command inside the root (no Python there), in /cvae-test: a private mount
    namespace with /proc, a clean environment, TMPDIR=/cvae-test/tmp (where the binary
    unpacks). `env` adds to or, with a None value, removes from that environment."""
    environment = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": f"{IN_ROOT}/tmp",
                   "TERM": "dumb"}
    environment.update(env or {})
    assignments = [f"{k}={v}" for k, v in environment.items() if v is not None]
    script = 'mount -t proc proc "$0/proc" && exec env -i "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(root),
           *assignments, UNSHARE, f"--root={root}", f"--wd={IN_ROOT}", *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    if check:
        assert result.returncode == 0, (f"{' '.join(args)} exited {result.returncode}\n"
                                        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result


def host_path(root, path_in_root):
    return Path(root) / path_in_root.lstrip("/")


# ---------------------------------------------------------------- a tiny IDX data set


def _read_idx_gz(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _synthetic(n, rng):
    """Zeros as rings and ones as strokes, with jitter: enough for a training smoke test."""
    yy, xx = np.mgrid[0:28, 0:28]
    labels = np.arange(n) % 2
    images = np.zeros((n, 28, 28), dtype=np.float64)
    for i, label in enumerate(labels):
        cy, cx = 14 + rng.normal(0, 1.5, size=2)
        if label == 0:
            r = np.hypot((yy - cy) / rng.uniform(7, 10), (xx - cx) / rng.uniform(5, 8))
            images[i] = np.exp(-((r - 1.0) / 0.18) ** 2)
        else:
            slope = rng.normal(0, 0.25)
            images[i] = np.exp(-((xx - cx - slope * (yy - cy)) / 1.3) ** 2) * (abs(yy - cy) < 10)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)


def write_tiny_mnist(directory, n_train=256, n_test=64):
    """Raw IDX files of digits 0 and 1: from the real MNIST in $CVAE_DATA when it is there,
    else synthetic."""
    directory.mkdir(parents=True)
    source = os.environ.get("CVAE_DATA", "")
    sets = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images_gz = os.path.join(source, f"{prefix}-images-idx3-ubyte.gz")
        labels_gz = os.path.join(source, f"{prefix}-labels-idx1-ubyte.gz")
        if source and os.path.isfile(images_gz) and os.path.isfile(labels_gz):
            images, labels = _read_idx_gz(images_gz), _read_idx_gz(labels_gz)
            keep = np.concatenate([np.flatnonzero(labels == d)[: n // 2] for d in (0, 1)])
            keep.sort()
            sets[split] = (images[keep], labels[keep])
        else:
            sets[split] = _synthetic(n, np.random.default_rng(7 if split == "train" else 8))
        write_split(directory, prefix, *sets[split])


def read_pgm(path):
    """(width, height, maxval, pixels) of a binary PGM (P5); fails on anything else."""
    data = Path(path).read_bytes()
    fields, pos = [], 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    pos += 1  # the single whitespace byte after maxval
    assert fields[0] == b"P5", f"{path}: not a binary PGM ({fields[0]!r})"
    width, height, maxval = (int(x) for x in fields[1:])
    assert 0 < maxval < 256
    pixels = data[pos:]
    assert len(pixels) == width * height, f"{path}: {len(pixels)} bytes of pixels for {width}x{height}"
    return width, height, maxval, pixels


def no_unpacked_leftovers(root, tmpdir=f"{IN_ROOT}/tmp"):
    """Neither staticx's unpacking (glibc and the program) nor PyInstaller's stays behind."""
    left = sorted(p.name for p in host_path(root, tmpdir).iterdir()
                  if p.name.startswith(("_MEI", "staticx-")))
    assert not left, f"the one-file launcher left {left} in TMPDIR"


# ---------------------------------------------------------------- tests


def test_root_has_no_python(root):
    result = in_root(root, "sh", "-c", "command -v python3 python; ls /usr/bin/python* "
                     "/usr/local/bin/python* /usr/lib/x86_64-linux-gnu/libpython* 2>/dev/null",
                     check=False)
    assert result.stdout.strip() == "", f"the root has Python: {result.stdout}"
    # Nor a system libgomp: the binary's own copy is the only one it can load.
    assert not list(host_path(root, "/usr/lib/x86_64-linux-gnu").glob("libgomp*"))


def test_help(root):
    times = []
    for _ in range(3):
        start = time.monotonic()
        result = in_root(root, "cvae", "--help")
        times.append(time.monotonic() - start)
    for command in ("train", "info", "data", "generate", "reconstruct", "interpolate", "bench",
                    "report", "prior"):
        assert command in result.stdout
    print(f"\ncvae --help in the root: {sorted(times)[1]:.2f} s (median of 3, incl. unshare/chroot)")
    result = in_root(root, "cvae", "train", "--help")
    assert "--threads" in result.stdout and "--epochs" in result.stdout
    result = in_root(root, "cvae", "prior", "train", "--help")
    for option in ("--checkpoint", "--resume", "--drop", "--blocks"):
        assert option in result.stdout, result.stdout
    no_unpacked_leftovers(root)


def test_version_and_kernel_dispatch(root):
    import cvae

    result = in_root(root, "cvae", "--version")
    line = result.stdout.strip()
    assert line.startswith(f"cvae {cvae.__version__} "), line
    assert "build" in line and "kernels" in line, line
    auto = line.split("kernels: ")[1].split()[0]
    assert auto in ("baseline", "v3", "v4", "v4bf16")
    # Every build the CPU supports can be forced; all four are inside the binary.
    for build in ("baseline", "v3", "v4", "v4bf16"):
        forced = in_root(root, "cvae", "--version", env={"CVAE_KERNELS": build}, check=False)
        if forced.returncode == 0:
            assert f"kernels: {build} build" in forced.stdout, forced.stdout
        else:
            assert "does not support" in forced.stderr, forced.stderr  # not this CPU; not missing
    if auto in ("v4", "v4bf16"):
        assert "kernels: v3 build" in in_root(root, "cvae", "--version", env={"CVAE_KERNELS": "v3"}).stdout


def _train(root, out, threads, extra=()):
    """A CVAE run without its flow prior (the tests train and check the prior themselves)."""
    return in_root(root, "cvae", "train", "--variant", "mini", "--epochs", "1", "--seed", "3",
                   "--data", f"{IN_ROOT}/data", "--out", out, "--threads", str(threads), "--quiet",
                   "--prior", "gaussian", *extra)


def test_train_generate_reconstruct_interpolate(root):
    _train(root, "run", 2)
    run = host_path(root, f"{IN_ROOT}/run")
    assert (run / "last.cvae").is_file()
    assert (run / "metrics.jsonl").is_file()

    in_root(root, "cvae", "generate", "--checkpoint", "run", "--per-digit", "5", "--seed", "1",
            "--out", "gen.pgm", "--threads", "2")
    width, height, _, pixels = read_pgm(host_path(root, f"{IN_ROOT}/gen.pgm"))
    assert len(set(pixels)) > 2, "a blank sheet"
    sidecar = json.loads(host_path(root, f"{IN_ROOT}/gen.json").read_text())
    assert (sidecar["width"], sidecar["height"]) == (width, height)
    labels = sorted(cell["label"] for cell in sidecar["cells"] if cell.get("kind") == "sample")
    assert labels == [0] * 5 + [1] * 5, sidecar["cells"]
    # After training, the run directory got its sheets too.
    for name in ("samples", "reconstructions", "interpolations"):
        read_pgm(run / f"{name}.pgm")
        json.loads((run / f"{name}.json").read_text())

    # The same seed gives the same sheet.
    in_root(root, "cvae", "generate", "--checkpoint", "run/last.cvae", "--per-digit", "5",
            "--seed", "1", "--out", "gen2.pgm", "--threads", "1")
    assert host_path(root, f"{IN_ROOT}/gen2.pgm").read_bytes() == pixels_file(root, "gen.pgm")

    in_root(root, "cvae", "reconstruct", "--checkpoint", "run", "--data", f"{IN_ROOT}/data",
            "--n", "8", "--out", "rec.pgm")
    read_pgm(host_path(root, f"{IN_ROOT}/rec.pgm"))
    json.loads(host_path(root, f"{IN_ROOT}/rec.json").read_text())
    in_root(root, "cvae", "interpolate", "--checkpoint", "run", "--data", f"{IN_ROOT}/data",
            "--pairs", "2", "--steps", "4", "--out", "interp.pgm")
    read_pgm(host_path(root, f"{IN_ROOT}/interp.pgm"))
    read_pgm(host_path(root, f"{IN_ROOT}/interp-classes.pgm"))
    no_unpacked_leftovers(root)


def test_pictures_and_report(root):
    """matplotlib (Agg only) is inside: training draws curves.png and latent.png, and
    `cvae report` writes a self-contained page, drawing a missing latent.png from --data.
    No font or config warnings on stderr (the trimmed mpl-data is enough)."""
    import io

    from PIL import Image
    from .test_report import RUN_SHEETS, assert_self_contained, images_of, parse

    _train(root, "run-report", 2)
    run = host_path(root, f"{IN_ROOT}/run-report")
    sizes = {}
    for name in ("curves.png", "latent.png"):
        image = Image.open(io.BytesIO((run / name).read_bytes()))
        image.load()
        sizes[name] = image.size
    assert sizes == {"curves.png": (1300, 750), "latent.png": (800, 650)}
    (run / "latent.png").unlink()
    result = in_root(root, "cvae", "report", "run-report", "--data", f"{IN_ROOT}/data",
                     "--threads", "2")
    assert "report (6 picture(s)) -> run-report/report.html" in result.stdout, result.stdout
    assert result.stderr == "", result.stderr
    assert (run / "latent.png").is_file()
    page = parse(run / "report.html")
    assert_self_contained(page)
    assert [alt for alt, *_ in images_of(page)] == ["training curves", "latent means, PCA",
                                                    *RUN_SHEETS]
    bad = in_root(root, "cvae", "report", "no-such-run", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("cvae: error: ") and "does not exist" in bad.stderr
    no_unpacked_leftovers(root)


def test_conv_variant_and_its_default_prior(root):
    """The conv CVAE runs in the binary's kernels like the MLP: a tiny conv run trains, with
    its flow prior by default (`cvae train` without --prior), and generates from it."""
    in_root(root, "cvae", "train", "--variant", "conv", "--channels", "3,5", "--hidden", "24",
            "--latent", "4", "--digits", "0,1", "--epochs", "1", "--seed", "3", "--data",
            f"{IN_ROOT}/data", "--out", "run-conv", "--threads", "2", "--quiet", "--no-images")
    meta = json.loads(pixels_file(root, "run-conv/config.json"))
    assert meta["arch"]["type"] == "conv" and meta["prior"] == "flow"
    assert host_path(root, f"{IN_ROOT}/run-conv/prior.cvae").is_file()
    in_root(root, "cvae", "generate", "--checkpoint", "run-conv", "--per-digit", "3", "--out",
            "conv.pgm", "--threads", "2")
    sidecar = json.loads(pixels_file(root, "conv.json"))
    assert sidecar["extra"]["prior"] == "flow"
    assert sorted(c["label"] for c in sidecar["cells"] if c.get("kind") == "sample") == \
        [0, 0, 0, 1, 1, 1]
    no_unpacked_leftovers(root)


def test_eval_and_the_shipped_classifier(root):
    """The classifier ships inside the binary: `cvae classifier eval` reads it, and `cvae eval`
    judges samples with it when given (the tiny test set here is not MNIST's, so by default
    eval says it has no classifier for it)."""
    _train(root, "run-eval", 2, ("--no-images",))
    result = in_root(root, "cvae", "classifier", "eval", "--data", f"{IN_ROOT}/data", "--json")
    accuracy = json.loads(result.stdout)["test_accuracy"]
    if os.environ.get("CVAE_DATA"):  # 64 real test digits 0 and 1
        assert accuracy >= 0.95, accuracy
    result = in_root(root, "cvae", "eval", "--checkpoint", "run-eval", "--data", f"{IN_ROOT}/data",
                     "--k", "3", "--samples", "20", "--json")
    plain = json.loads(result.stdout)
    assert plain["cond_accuracy"] is None and "cvae classifier train" in plain["classifier_note"]
    from cvae.classifier import SHIPPED

    shutil.copy(SHIPPED, host_path(root, f"{IN_ROOT}/judge.cvae"))
    result = in_root(root, "cvae", "eval", "--checkpoint", "run-eval", "--data", f"{IN_ROOT}/data",
                     "--k", "3", "--samples", "20", "--classifier", "judge.cvae", "--json")
    judged = json.loads(result.stdout)
    assert 0 <= judged["cond_accuracy"] <= 1 and judged["fid"] >= 0
    assert judged["neg_elbo"] == plain["neg_elbo"]
    no_unpacked_leftovers(root)


def test_flow_prior(root):
    """cvae.prior is inside: `cvae prior train` trains the run's prior.cvae (the same bytes on
    1 and 2 threads), `cvae generate` samples from it by default and says so in its sidecar,
    and `cvae eval` scores both the flow and the N(0, I) prior."""
    _train(root, "run-prior", 2, ("--no-images",))
    run = host_path(root, f"{IN_ROOT}/run-prior")
    bad = in_root(root, "cvae", "generate", "--checkpoint", "run-prior", "--prior", "flow",
                  check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("cvae: error: ") and "no flow prior" in bad.stderr
    assert not (run / "generate.pgm").exists()
    shutil.copytree(run, host_path(root, f"{IN_ROOT}/run-prior-t1"))

    settings = ("--epochs", "3", "--hidden", "32", "--blocks", "1", "--batch", "64")
    result = in_root(root, "cvae", "prior", "train", "--checkpoint", "run-prior", *settings,
                     "--threads", "2", "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prior_epoch"] for r in records[:-1]] == [1, 2, 3], result.stdout
    assert records[-1]["prior"] == "run-prior/prior.cvae"  # as the run was named
    assert records[-1]["codes"] == 256 and records[-1]["threads"] == 2
    in_root(root, "cvae", "prior", "train", "--checkpoint", "run-prior-t1", *settings,
            "--threads", "1", "--quiet")
    assert (run / "prior.cvae").read_bytes() == pixels_file(root, "run-prior-t1/prior.cvae"), \
        "--threads 1 and --threads 2 trained different priors"
    again = in_root(root, "cvae", "prior", "train", "--checkpoint", "run-prior", check=False)
    assert again.returncode == 2 and "already has a prior" in again.stderr, again.stderr

    in_root(root, "cvae", "generate", "--checkpoint", "run-prior", "--per-digit", "5", "--seed",
            "1", "--out", "flow.pgm", "--threads", "2")
    width, height, _, pixels = read_pgm(host_path(root, f"{IN_ROOT}/flow.pgm"))
    assert len(set(pixels)) > 2, "a blank sheet"
    sidecar = json.loads(pixels_file(root, "flow.json"))
    assert (sidecar["width"], sidecar["height"]) == (width, height)
    extra = sidecar["extra"]
    # relative to the sheet's directory (IN_ROOT): no machine paths in the file
    assert extra["prior"] == "flow" and extra["prior_file"] == "run-prior/prior.cvae"
    assert (extra["steps"], extra["method"], extra["guidance"]) == (2, "midpoint", 2.0)  # defaults
    labels = sorted(cell["label"] for cell in sidecar["cells"] if cell.get("kind") == "sample")
    assert labels == [0] * 5 + [1] * 5
    in_root(root, "cvae", "generate", "--checkpoint", "run-prior", "--per-digit", "5", "--seed",
            "1", "--out", "flow1.pgm", "--threads", "1")
    assert pixels_file(root, "flow1.pgm") == pixels_file(root, "flow.pgm")
    in_root(root, "cvae", "generate", "--checkpoint", "run-prior", "--per-digit", "5", "--seed",
            "1", "--out", "gauss.pgm", "--prior", "gaussian")
    assert json.loads(pixels_file(root, "gauss.json"))["extra"]["prior"] == "gaussian"
    assert pixels_file(root, "gauss.pgm") != pixels_file(root, "flow.pgm")

    from cvae.classifier import SHIPPED

    shutil.copy(SHIPPED, host_path(root, f"{IN_ROOT}/judge.cvae"))
    result = in_root(root, "cvae", "eval", "--checkpoint", "run-prior", "--data",
                     f"{IN_ROOT}/data", "--k", "2", "--samples", "20", "--classifier",
                     "judge.cvae", "--threads", "2", "--json")
    judged = json.loads(result.stdout)
    assert list(judged["by_prior"]) == ["flow", "gaussian"] and judged["prior"] == "flow"
    for name, entry in judged["by_prior"].items():
        assert 0 <= entry["cond_accuracy"] <= 1 and entry["fid"] >= 0, (name, entry)
        assert entry["diversity"] > 0, (name, entry)
    assert judged["by_prior"]["flow"]["prior_file"] == "prior.cvae"  # beside eval.json
    assert judged["diversity_test"] > 0
    no_unpacked_leftovers(root)


def test_sweep(root):
    """cvae sweep trains, evaluates and tabulates in-process in the binary too, and a rerun
    skips the finished runs."""
    argv = ("cvae", "sweep", "--variant", "mini", "--latent", "4,8", "--hidden", "32x16",
            "--epochs", "1", "--k", "2", "--samples", "10", "--data", f"{IN_ROOT}/data",
            "--out", "sweep", "--threads", "2", "--quiet")
    in_root(root, *argv)
    rows = [json.loads(line) for line in
            host_path(root, f"{IN_ROOT}/sweep/sweep.jsonl").read_text().splitlines()]
    assert [r["latent"] for r in rows] == [4, 8]
    assert all(r["neg_elbo"] > 0 for r in rows)
    assert "latent8-h32x16-elu-progressive" in host_path(root, f"{IN_ROOT}/sweep/sweep.md").read_text()
    again = in_root(root, *argv[:-1])
    assert again.stdout.count("skipped (finished)") == 2, again.stdout
    no_unpacked_leftovers(root)


def pixels_file(root, name):
    return host_path(root, f"{IN_ROOT}/{name}").read_bytes()


def test_threads_1_and_2_give_identical_checkpoints(root):
    _train(root, "run-t1", 1, ("--no-images",))
    _train(root, "run-t2", 2, ("--no-images",))
    one = host_path(root, f"{IN_ROOT}/run-t1/last.cvae").read_bytes()
    two = host_path(root, f"{IN_ROOT}/run-t2/last.cvae").read_bytes()
    assert one == two, "--threads 1 and --threads 2 trained different checkpoints"


def test_bundled_libgomp_one_pool_and_sigterm(root):
    """While training with --threads 2, the worker maps libgomp from its unpack directory
    (there is no other in the root) and runs 2 threads: OpenMP's, none of OpenBLAS's.
    SIGTERM to the launcher reaches the trainer (checkpoint, exit 143), and the launcher
    removes its unpack directory."""
    proc = in_root(root, "cvae", "train", "--variant", "mini", "--epochs", "5000", "--data",
                   f"{IN_ROOT}/data", "--out", "run-term", "--threads", "2", "--quiet",
                   "--no-images", popen=True)
    try:
        worker, libgomp, deadline = None, None, time.monotonic() + 120
        while libgomp is None and time.monotonic() < deadline and proc.poll() is None:
            for pid in _descendants(proc.pid)[1:]:
                try:
                    maps = Path(f"/proc/{pid}/maps").read_text()
                except OSError:
                    continue
                hits = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
                if hits:
                    worker, libgomp = pid, hits
                    break
            time.sleep(0.05)
        assert libgomp, "libgomp never showed up in the worker's memory maps"
        assert all("/_MEI" in path for path in libgomp), libgomp
        time.sleep(1.0)  # into the training loop: the OpenMP pool is up
        n_threads = len(os.listdir(f"/proc/{worker}/task"))
        assert n_threads <= 2, f"{n_threads} threads in the worker with --threads 2"
        launcher = _descendants(proc.pid)[0]  # unshare, sh, chroot, env and sh exec each other
        os.kill(launcher, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert "SIGTERM" in stderr and "--resume" in stderr, stderr
    assert host_path(root, f"{IN_ROOT}/run-term/last.cvae").is_file()
    no_unpacked_leftovers(root)


def _descendants(pid):
    """pid and its descendants that run a cvae executable, outermost first."""
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop(0)
        try:
            # The launcher is /usr/local/bin/cvae; staticx runs the PyInstaller program it
            # unpacked, $TMPDIR/staticx-*/cvae, which runs the Python worker.
            if os.path.basename(os.readlink(f"/proc/{current}/exe")) == "cvae":
                found.append(current)
        except OSError:
            pass
        try:
            frontier.extend(map(int, Path(f"/proc/{current}/task/{current}/children").read_text().split()))
        except OSError:
            pass
    return found


# ---------------------------------------------------------------- roots without a fitting glibc


def _program_headers(path):
    """The ELF program header types of an x86-64 executable."""
    data = Path(path).read_bytes()[:1 << 16]
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path}: not a 64-bit ELF file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


def test_binary_is_static(binary):
    """No PT_INTERP (3) and no PT_DYNAMIC (2): the kernel starts it by itself, no ld.so or libc
    of the machine is ever asked for (so `ldd` has nothing to say about it)."""
    types = _program_headers(binary)
    assert 1 in types, types  # PT_LOAD: it did parse
    assert 3 not in types and 2 not in types, f"dist/cvae is dynamically linked: {types}"


@pytest.fixture(scope="module", params=["empty", "bullseye"])
def bare_root(request, binary, tmp_path_factory):
    """A root whose libc cannot serve the binary: none at all (empty: the binary, the data,
    /proc and /tmp, nothing else), or Debian 11's glibc 2.31. The binary is
    /usr/local/bin/cvae, the data /cvae-test/data; yields (kind, root)."""
    kind = request.param
    if kind == "empty":
        root = tmp_path_factory.mktemp("empty-root")
        for directory in ("proc", "tmp", "usr/local/bin", IN_ROOT.lstrip("/")):
            (root / directory).mkdir(parents=True)
        (root / "tmp").chmod(0o1777)
        shutil.copy2(binary, root / "usr" / "local" / "bin" / "cvae")
        write_tiny_mnist(root / IN_ROOT.lstrip("/") / "data")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
        assert files == ["cvae-test/data/t10k-images-idx3-ubyte", "cvae-test/data/t10k-labels-idx1-ubyte",
                         "cvae-test/data/train-images-idx3-ubyte", "cvae-test/data/train-labels-idx1-ubyte",
                         "usr/local/bin/cvae"], files
        yield kind, root
        shutil.rmtree(root, ignore_errors=True)
        return

    import fcntl

    result = subprocess.run([str(PACKAGING / "make_chroot.sh"), "--suite", kind],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            timeout=30 * 60)
    assert result.returncode == 0, f"make_chroot.sh --suite {kind} failed:\n{result.stderr[-4000:]}"
    root = Path(result.stdout.strip().splitlines()[-1])
    lock = open(f"{root}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        # The point of this root: a glibc older than the one the bundled libraries ask for.
        libc = sorted(p.name for p in (root / "lib" / "x86_64-linux-gnu").glob("libc-2.*.so"))
        assert libc == ["libc-2.31.so"], libc
        shutil.copy2(binary, root / "usr" / "local" / "bin" / "cvae")
        work = root / IN_ROOT.lstrip("/")
        shutil.rmtree(work, ignore_errors=True)
        (work / "tmp").mkdir(parents=True)
        write_tiny_mnist(work / "data")
        yield kind, root
        shutil.rmtree(work, ignore_errors=True)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def test_help_train_generate_eval_prior_without_a_fitting_libc(bare_root):
    """--help, a short train on 1 and 2 threads (the bundled libgomp; byte-identical
    checkpoints), generate, eval with the shipped classifier, and prior train, in a root with
    no libc (where also no HOME, no /etc, no shell exist) and in Debian 11's."""
    kind, root = bare_root
    # The empty root: TMPDIR unset (the default /tmp), and no HOME: like a scratch container.
    env = {"TMPDIR": None, "HOME": None} if kind == "empty" else {}
    tmpdir = "/tmp" if kind == "empty" else f"{IN_ROOT}/tmp"

    def run(*args):
        return in_root(root, *args, env=env)

    result = run("cvae", "--help")
    for command in ("train", "generate", "eval", "prior"):
        assert command in result.stdout
    for threads in (1, 2):
        run("cvae", "train", "--variant", "mini", "--epochs", "1", "--seed", "3", "--data",
            f"{IN_ROOT}/data", "--out", f"run-t{threads}", "--threads", str(threads), "--quiet",
            "--prior", "gaussian")
    one, two = (host_path(root, f"{IN_ROOT}/run-t{t}/last.cvae").read_bytes() for t in (1, 2))
    assert one == two, "--threads 1 and --threads 2 trained different checkpoints"

    run("cvae", "generate", "--checkpoint", "run-t2", "--per-digit", "5", "--seed", "1",
        "--out", "gen.pgm", "--threads", "2")
    width, height, _, pixels = read_pgm(host_path(root, f"{IN_ROOT}/gen.pgm"))
    assert len(set(pixels)) > 2, "a blank sheet"
    sidecar = json.loads(pixels_file(root, "gen.json"))
    assert (sidecar["width"], sidecar["height"]) == (width, height)

    from cvae.classifier import SHIPPED

    shutil.copy(SHIPPED, host_path(root, f"{IN_ROOT}/judge.cvae"))
    result = run("cvae", "eval", "--checkpoint", "run-t2", "--data", f"{IN_ROOT}/data", "--k", "2",
                 "--samples", "20", "--classifier", "judge.cvae", "--threads", "2", "--json")
    judged = json.loads(result.stdout)
    assert 0 <= judged["cond_accuracy"] <= 1 and judged["fid"] >= 0, judged

    result = run("cvae", "prior", "train", "--checkpoint", "run-t2", "--epochs", "2", "--hidden",
                 "32", "--blocks", "1", "--batch", "64", "--threads", "2", "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prior_epoch"] for r in records[:-1]] == [1, 2], result.stdout
    assert host_path(root, f"{IN_ROOT}/run-t2/prior.cvae").is_file()
    no_unpacked_leftovers(root, tmpdir)
