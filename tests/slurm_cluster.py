"""A one-node Slurm for the tests: munged, slurmctld and slurmd from Debian's packages
(`slurmctld slurmd slurm-client munge`), started for a test session and stopped after it.

Everything lives under one temporary directory: the munge key and socket, slurm.conf, the
state and spool directories, pid and log files. The daemons listen on free local ports and
are told where slurm.conf is through SLURM_CONF, which the client commands (sbatch, squeue,
sinfo) read too, so nothing in /etc is used and a Slurm the machine may already run is left
alone. It runs as root (slurmd must); the tests skip elsewhere, and fail in CI (`CI` set)
when root has no Slurm, as the browser test does.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

PACKAGES = "slurmctld slurmd slurm-client munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")
STARTUP_SECONDS = 60  # a generous bound on the daemons coming up; not a timed assertion
DEFAULT_JOB_SECONDS = 600


def _which(name):
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)


def unavailable():
    """Why this machine cannot run the test cluster, or None. Not root / not Linux: a skip
    everywhere. Missing packages: a skip, but a failure in CI (which installs them)."""
    if not sys.platform.startswith("linux"):
        return "skip", "the test Slurm runs on Linux only"
    if os.geteuid() != 0:
        return "skip", "the test Slurm needs root (slurmd runs jobs as their user)"
    missing = [name for name in DAEMONS + CLIENTS + ("mungekey",) if _which(name) is None]
    if missing:
        how = (f"{', '.join(missing)} not found (Debian: apt-get install {PACKAGES}; .ci/run "
               f"installs them)")
        return ("fail" if os.environ.get("CI") else "skip"), how
    return None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(count):
    ports = set()
    while len(ports) < count:
        ports.add(_free_port())
    return sorted(ports)


SLURM_CONF = """\
# Written by tests/slurm_cluster.py: a one-node cluster for the tests, nothing outside {root}.
ClusterName=cvaetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked through /proc and tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
MaxArraySize=1001
# a job whose dependency failed (merge after a failed shard) is cancelled, not left pending
DependencyParameters=kill_invalid_depend
# The node is what this file says (2 CPUs, the sbatch files ask for 2 a task), not what slurmd
# finds: a smaller CI machine still runs every job instead of draining the node.
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """The running test cluster: .env is the environment its client commands need."""

    def __init__(self, root, cpus=2, memory=1000):
        self.root = os.fspath(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus, self.memory = cpus, memory
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket.2")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for name in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))]:
            if name != "SLURM_CONF":  # this session's own job, if pytest runs inside one
                del self.env[name]
        self.processes = {}

    # ------------------------------------------------------------ start and stop

    def _path(self, *parts):
        return os.path.join(self.root, *parts)

    def start(self):
        for sub in ("munge", "state", "spool", "run", "log"):
            os.makedirs(self._path(sub), mode=0o700, exist_ok=True)
        key = self._path("munge", "munge.key")
        subprocess.run([_which("mungekey"), "--create", "--keyfile", key], check=True,
                       capture_output=True)
        os.chmod(key, 0o600)
        self._spawn("munged", [_which("munged"), "--foreground", "--force",
                               "--socket", self.munge_socket, "--key-file", key,
                               "--pid-file", self._path("munge", "munged.pid"),
                               "--log-file", self._path("log", "munged.log"),
                               "--seed-file", self._path("munge", "munged.seed")])
        self._wait(lambda: os.path.exists(self.munge_socket), "munged to open its socket")
        ctld_port, slurmd_port = _free_ports(2)
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(root=self.root, host=self.host, ctld_port=ctld_port,
                                      slurmd_port=slurmd_port, munge_socket=self.munge_socket,
                                      cpus=self.cpus, memory=self.memory))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.host, "-f", self.conf])
        self._wait(self._node_idle, f"node {self.host} to be idle in sinfo")
        return self

    def _spawn(self, name, argv):
        log = open(self._path("log", f"{name}.out"), "wb")
        # Its own session: stop() signals the daemon and anything it forked, and a Ctrl-C
        # of pytest does not reach the daemons before the fixture's teardown does.
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)
        log.close()

    def _wait(self, ready, what, seconds=STARTUP_SECONDS):
        deadline = time.monotonic() + seconds
        while not ready():
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"no sign after {seconds} s"
                raise RuntimeError(f"test Slurm: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.5)

    def _node_idle(self):
        result = subprocess.run(["sinfo", "--noheader", "--nodes", self.host, "--format", "%T"],
                                env=self.env, capture_output=True, text=True)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def stop(self):
        """Cancel the cluster's jobs, stop every daemon it started (their whole process groups,
        by pid: SIGTERM, then SIGKILL for any still there after 15 s), then kill whatever is
        left of it: the processes whose environment names this cluster's slurm.conf (job
        steps, slurmstepd), which no other process has."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], env=self.env,
                           capture_output=True)
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            # slurmstepd children of a job left behind live in slurmd's group too
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.processes.clear()
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _leftovers(self):
        """Pids of live processes started under this cluster (SLURM_CONF=its slurm.conf)."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read() + b"\0":
                        found.append(int(entry))
            except OSError:
                pass
        return found

    def logs(self, tail=40):
        parts = []
        for name in sorted(os.listdir(self._path("log"))):
            with open(self._path("log", name), errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------ jobs

    def sbatch(self, script, *script_args, options=(), cwd, env=None):
        """Submit script (a path) with sbatch options and the script's own arguments; returns
        the job id."""
        result = subprocess.run(["sbatch", "--parsable", *map(str, options), os.fspath(script),
                                 *map(str, script_args)],
                                cwd=cwd, env={**self.env, **(env or {})}, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise AssertionError(f"sbatch failed ({result.returncode}): {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def wait(self, job_id, seconds=DEFAULT_JOB_SECONDS):
        """Wait until no task of job_id is in squeue (there is no accounting database, so sacct
        is not available: the job's output files say how each task ended)."""
        deadline = time.monotonic() + seconds
        while True:
            result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--array",
                                     "--format", "%i %T %R"], env=self.env,
                                    capture_output=True, text=True)
            # squeue errors out on a job id it no longer knows: that also means it is done
            if result.returncode != 0 or not result.stdout.strip():
                return
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env)
                raise AssertionError(f"job {job_id} still queued after {seconds} s:\n"
                                     f"{result.stdout}\n{self.logs()}")
            time.sleep(1)

    def job_states(self, job_id):
        """{task id or '': (state, exit code)} from scontrol, while the controller remembers
        the job (MinJobAge)."""
        result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=self.env,
                                capture_output=True, text=True, check=True)
        states = {}
        for line in result.stdout.splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            states[fields.get("ArrayTaskId", "")] = (fields.get("JobState"),
                                                     fields.get("ExitCode"))
        return states


def cluster_fixture(tmp_path_factory):
    """The body of a session fixture: yields a started SlurmCluster and always stops it."""
    why = unavailable()
    if why is not None:
        kind, text = why
        if kind == "fail":
            pytest.fail(f"{text}: CI is set, so the Slurm tests must run")
        pytest.skip(text)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
