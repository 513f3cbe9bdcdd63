"""Splitting one generation over N independent jobs: `--shard K/N` and `--shard slurm`.

A shard is (k, n), 1-based. Shard k owns a contiguous share of the work's units (whole sheets,
or rows of an IDX set): units [floor((k-1)·total/n), floor(k·total/n)), so the shares of
k = 1 .. n cover every unit once and in order, and differ in size by at most one. What a unit
holds never depends on the shard: every digit's draws are keyed by its global index
(cvae.sample.KeyedNormals), so the shards together write what one unsharded run writes.
"""

import re
from dataclasses import dataclass

from cvae.errors import CvaeError

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                   "SLURM_ARRAY_TASK_COUNT")


@dataclass(frozen=True)
class Shard:
    k: int  # 1-based
    n: int

    def __post_init__(self):
        if not 1 <= self.k <= self.n:
            raise CvaeError(f"shard {self.k}/{self.n}: K must be between 1 and N")

    def share(self, total):
        """(start, stop): this shard's units of `total`."""
        return (self.k - 1) * total // self.n, self.k * total // self.n

    def __str__(self):
        return f"{self.k}/{self.n}"


def parse_shard(text, environ=None):
    """A Shard from '--shard K/N' (1-based) or '--shard slurm' (from the Slurm job array's
    variables in environ); None for None. Bad text, or 'slurm' outside a job array, is a
    one-line CvaeError."""
    if text is None:
        return None
    if text.strip().lower() == "slurm":
        return slurm_shard({} if environ is None else environ)
    match = _SPEC.match(text)
    if not match:
        raise CvaeError(f"--shard must be K/N (1-based, e.g. 2/4) or 'slurm', got {text!r}")
    k, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= k <= n:
        raise CvaeError(f"--shard {text}: need 1 <= K <= N")
    return Shard(k, n)


def slurm_shard(environ):
    """The Shard of this Slurm array task: K = (SLURM_ARRAY_TASK_ID - _MIN) / _STEP + 1,
    N = SLURM_ARRAY_TASK_COUNT. An array whose indices are not one evenly stepped range
    (--array=0,2,7) is refused: its tasks could not tell which share is theirs."""
    missing = [name for name in SLURM_VARIABLES if not environ.get(name)]
    if missing:
        raise CvaeError(f"--shard slurm needs a Slurm job array task ({', '.join(missing)} not "
                        f"set): submit with sbatch --array=..., or give --shard K/N")
    try:
        task, low, step, count = (int(environ[name]) for name in SLURM_VARIABLES)
        high = int(environ.get("SLURM_ARRAY_TASK_MAX", low + (count - 1) * step))
    except ValueError:
        values = ", ".join(f"{name}={environ[name]!r}" for name in SLURM_VARIABLES)
        raise CvaeError(f"--shard slurm: the array variables are not integers ({values})") from None
    if (step < 1 or count < 1 or (task - low) % step or not low <= task <= high
            or high != low + (count - 1) * step):
        raise CvaeError(f"--shard slurm: the job array is not one evenly stepped range (task "
                        f"{task}, min {low}, max {high}, step {step}, count {count}): submit "
                        f"with --array=A-B or A-B:S")
    return Shard((task - low) // step + 1, count)
