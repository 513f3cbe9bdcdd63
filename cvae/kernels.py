"""Picks the kernel build for this CPU: x86-64-v4, x86-64-v3 or the portable baseline.

A -march=x86-64-v3/v4 module can crash an older CPU at import time, so the baseline build
(which imports anywhere) reports the CPU's level first. CVAE_KERNELS=baseline|v3|v4 forces a
build (for comparisons, or to work around a suspect one); auto is the default.
"""

import importlib
import os

from cvae.errors import CvaeError

# The GEMM and Adam loops use schedule(runtime). guided hands out large contiguous chunks
# first (each thread keeps streaming neighbouring rows, as with static) and small ones at the
# end, so a thread that lost its core to another process does not hold work hostage. Any
# schedule gives bit-identical results: which thread runs a task never changes its result.
os.environ.setdefault("OMP_SCHEDULE", "guided")

BUILDS = {"v4": 4, "v3": 3, "baseline": 1}
_MODULES = {"v4": "cvae._kernels_v4", "v3": "cvae._kernels_v3", "baseline": "cvae._kernels_base"}


def _import(build):
    try:
        return importlib.import_module(_MODULES[build])
    except ImportError:
        return None


def load():
    """The kernel module to use and its build name."""
    baseline = _import("baseline")
    if baseline is None:
        raise CvaeError("cvae's compiled kernels are missing: reinstall with 'pip install .'")
    level = baseline.cpu_level()
    wanted = os.environ.get("CVAE_KERNELS", "auto").strip().lower() or "auto"
    if wanted not in ("auto", *BUILDS):
        raise CvaeError(f"CVAE_KERNELS={wanted!r}: use auto, baseline, v3 or v4")
    if wanted != "auto":
        if BUILDS[wanted] > level:
            raise CvaeError(f"CVAE_KERNELS={wanted}: this CPU does not support x86-64-{wanted}")
        module = _import(wanted)
        if module is None:
            raise CvaeError(f"CVAE_KERNELS={wanted}: this installation has no {wanted} build")
        return module, wanted
    for build, needed in BUILDS.items():
        if needed <= level:
            module = _import(build)
            if module is not None:
                return module, build
    return baseline, "baseline"


_loaded = None


def kernels():
    global _loaded
    if _loaded is None:
        _loaded = load()
    return _loaded[0]


def build_name():
    kernels()
    return _loaded[1]


def default_threads():
    """The thread count when none is given: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
