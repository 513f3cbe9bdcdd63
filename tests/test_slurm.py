"""Real Slurm job arrays on a one-node cluster (tests/slurm_cluster.py), running the sbatch
files of examples/slurm/ as the README gives them: (1) the README's sweep, its
`cvae sweep --commands` lines one per array task, then `cvae sweep --collect`: the table
`cvae sweep` itself writes; (2) sharded generations of sheets and of an IDX set (then
`cvae data merge` as a dependent job) for N = 1, 3 and 4: byte for byte the files of one
unsharded run.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge: skipped otherwise, but a
failure in CI (`CI` set), which installs them (.ci/run)."""

import os
import sys

import numpy as np
import pytest

from cvae.model import Arch, Model

from .conftest import checkpoint_world, run_cli, tree, write_mnist_dir
from .slurm_cluster import cluster_fixture

pytestmark = pytest.mark.usefixtures("no_real_data")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "slurm")
SWEEP_OPTIONS = ["--hidden", "32x16", "--epochs", "2", "--batch", "16", "--threads", "1",
                 "--k", "3"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    yield from cluster_fixture(tmp_path_factory)


def job_env(tmp_path):
    """The environment jobs are submitted with (sbatch passes it on): a `cvae` on PATH that
    runs this checkout with this test's Python, and this test's cache, not the user's."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "cvae").write_text(f"#!/bin/sh\nexec {sys.executable} -m cvae \"$@\"\n")
    (shim / "cvae").chmod(0o755)
    env = {"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CVAE_CACHE": os.environ["CVAE_CACHE"]}
    return env


def logs(directory):
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}"
                     for p in sorted(directory.glob("*.out")))


def assert_completed(slurm, job, tasks, log_dir):
    states = slurm.job_states(job)
    expected = {str(t) for t in range(tasks)} if tasks else {""}
    assert set(states) == expected and all(s == ("COMPLETED", "0:0") for s in states.values()), \
        f"{states}\n{logs(log_dir)}"


def test_readme_sweep_runs_as_a_job_array(slurm, capsys, tmp_path):
    data = write_mnist_dir(tmp_path / "mnist")
    out = tmp_path / "jobs" / "sweep"  # the same name as the reference: the table is titled by it
    code, lines, err = run_cli(capsys, "sweep", "--latent", "4,8", *SWEEP_OPTIONS, "--data", data,
                               "--out", out, "--commands")
    assert code == 0, err
    assert len(lines.splitlines()) == 2
    (tmp_path / "jobs.txt").write_text(lines)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    job = slurm.sbatch(os.path.join(EXAMPLES, "sweep.sbatch"), "jobs.txt",
                       options=["--array=0-1", f"--output={log_dir}/sweep-%a.out"],
                       cwd=tmp_path, env=job_env(tmp_path))
    slurm.wait(job)
    assert_completed(slurm, job, 2, log_dir)
    code, stdout, err = run_cli(capsys, "sweep", "--collect", out)
    assert code == 0, err
    assert "2 finished run(s)" in stdout

    swept = tmp_path / "reference" / "sweep"
    code, _, err = run_cli(capsys, "sweep", "--latent", "4,8", *SWEEP_OPTIONS, "--data", data,
                           "--out", swept, "--quiet")
    assert code == 0, err
    for name in ("sweep.jsonl", "sweep.md"):
        assert (out / name).read_text() == (swept / name).read_text(), name


@pytest.fixture
def world(tmp_path):
    model = Model(Arch(h1=32, h2=16, latent=8), max_batch=64, threads=1)
    model.init_params(0)
    images = np.random.default_rng(1).integers(0, 256, size=(40, 784), dtype=np.uint8)
    labels = (np.arange(40) % 10).astype(np.uint8)
    return checkpoint_world(tmp_path, model, [0, 1, 2, 3], images, labels)


SHEETS = ["--per-digit", "9", "--cols", "4", "--max-rows", "2", "--seed", "3"]  # 6 sheets
IDX = ["--format", "idx", "--per-digit", "50", "--seed", "4", "--temperature", "0.8"]


def test_sharded_generation_as_job_arrays_equals_one_run(slurm, capsys, world, tmp_path):
    ckpt = world["ckpt"]
    whole = tmp_path / "whole"
    whole.mkdir()
    code, _, err = run_cli(capsys, "generate", "--checkpoint", ckpt, *SHEETS, "--threads", "1",
                           "--out", whole / "g.pgm")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--checkpoint", ckpt, *IDX, "--threads", "1",
                           "--out", whole / "set")
    assert code == 0, err
    sheets, idx_set = tree(whole, skip=("set",)), tree(whole / "set")
    assert len(sheets) == 12 and len(idx_set) == 3

    env, log_dir = job_env(tmp_path), tmp_path / "logs"
    log_dir.mkdir()
    generate = os.path.join(EXAMPLES, "generate.sbatch")
    jobs = []
    for n in (1, 3, 4):
        (tmp_path / f"n{n}").mkdir()
        # one CPU a task (--threads 1): two shards run at once on the two-CPU test node,
        # writing into the same directories, as shards of a real cluster do
        array = [f"--array=0-{n - 1}", "--cpus-per-task=1"]
        job = slurm.sbatch(generate, ckpt, f"n{n}/g.pgm", *SHEETS,
                           options=array + [f"--output={log_dir}/sheets{n}-%a.out"],
                           cwd=tmp_path, env=env)
        jobs.append((job, n, f"sheets{n}"))
        job = slurm.sbatch(generate, ckpt, f"n{n}/set", *IDX,
                           options=array + [f"--output={log_dir}/idx{n}-%a.out"],
                           cwd=tmp_path, env=env)
        jobs.append((job, n, f"idx{n}"))
        merge = slurm.sbatch(os.path.join(EXAMPLES, "merge.sbatch"), f"n{n}/set",
                             options=[f"--dependency=afterok:{job}",
                                      f"--output={log_dir}/merge{n}.out"],
                             cwd=tmp_path, env=env)
        jobs.append((merge, 0, f"merge{n}"))
    for job, _, _ in jobs:
        slurm.wait(job)
    for job, tasks, name in jobs:
        assert_completed(slurm, job, tasks, log_dir)
        for task in range(tasks):  # each task's final line says which shard it was
            text = (log_dir / f"{name}-{task}.out").read_text()
            assert f"shard {task + 1}/{tasks}: generated " in text, text
    for n in (1, 3, 4):
        assert tree(tmp_path / f"n{n}", skip=("set",)) == sheets, n
        assert tree(tmp_path / f"n{n}" / "set", skip=("parts",)) == idx_set, n
        assert f"merged {n} part(s), 200 digits" in (log_dir / f"merge{n}.out").read_text()
