"""Picks the kernel build for this CPU: x86-64-v4 with AVX512_BF16, x86-64-v4, x86-64-v3 or
the portable baseline, and resolves the GEMM precision (fp32, bf16 or auto).

A -march=x86-64-v3/v4 module can crash an older CPU at import time, so the baseline build
(which imports anywhere) reports the CPU's level first. CVAE_KERNELS=baseline|v3|v4|v4bf16
forces a build (for comparisons, or to work around a suspect one); auto is the default.

bf16 runs on every build: v4bf16 computes its GEMMs with vdpbf16ps, the others run the same
bf16-rounded inputs through fp32 FMAs (same rounding of inputs, slower than fp32 itself), so a
bf16 run or checkpoint can be resumed anywhere. AMX (tdpbf16ps) is not used: this project's
machine has none to measure it on.
"""

import importlib
import os

from cvae.errors import CvaeError

# The GEMM and Adam loops use schedule(runtime). guided hands out large contiguous chunks
# first (each thread keeps streaming neighbouring rows, as with static) and small ones at the
# end, so a thread that lost its core to another process does not hold work hostage. Any
# schedule gives bit-identical results: which thread runs a task never changes its result.
os.environ.setdefault("OMP_SCHEDULE", "guided")

# Build -> x86-64 level it needs; v4bf16 needs AVX512_BF16 as well (_runs_here).
BUILDS = {"v4bf16": 4, "v4": 4, "v3": 3, "baseline": 1}
_MODULES = {"v4bf16": "cvae._kernels_v4bf16", "v4": "cvae._kernels_v4", "v3": "cvae._kernels_v3",
            "baseline": "cvae._kernels_base"}
PRECISIONS = ("fp32", "bf16", "auto")


def _import(build):
    try:
        return importlib.import_module(_MODULES[build])
    except ImportError:
        return None


def _runs_here(build, baseline):
    if BUILDS[build] > baseline.cpu_level():
        return False
    return build != "v4bf16" or baseline.cpu_bf16()


def load():
    """The kernel module to use and its build name."""
    baseline = _import("baseline")
    if baseline is None:
        raise CvaeError("cvae's compiled kernels are missing: reinstall with 'pip install .'")
    wanted = os.environ.get("CVAE_KERNELS", "auto").strip().lower() or "auto"
    if wanted not in ("auto", *BUILDS):
        raise CvaeError(f"CVAE_KERNELS={wanted!r}: use auto, baseline, v3, v4 or v4bf16")
    if wanted != "auto":
        if not _runs_here(wanted, baseline):
            what = "x86-64-v4 with AVX512_BF16" if wanted == "v4bf16" else f"x86-64-{wanted}"
            raise CvaeError(f"CVAE_KERNELS={wanted}: this CPU does not support {what}")
        module = _import(wanted)
        if module is None:
            raise CvaeError(f"CVAE_KERNELS={wanted}: this installation has no {wanted} build")
        return module, wanted
    for build in BUILDS:
        if _runs_here(build, baseline):
            module = _import(build)
            if module is not None:
                return module, build
    return baseline, "baseline"


_loaded = None


def sleep_when_waiting():
    """Have the kernels' OpenMP threads sleep as soon as they wait (OMP_WAIT_POLICY=passive)
    instead of spinning for some milliseconds first, libgomp's default, unless the environment
    already sets OMP_WAIT_POLICY or GOMP_SPINCOUNT. libgomp reads them once, as the kernels
    load: returns False (and changes nothing) when they already have.

    For generation, whose parallel loops alternate with the process's other threads (the
    sheet writer, the drawing thread): a thread spinning at a barrier takes the core those
    need: with two cores kept busy, 100,000 digits took 3.2 s instead of 10.2 s (medians of
    benchmarks/busy_generate.sh; see the README's Threads on a busy machine).
    Training keeps the default: its loops follow each other with nothing in between, and a
    sleeping thread's wake-up would cost every one of them."""
    if _loaded is not None:
        return False
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "passive"
    return True


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


def native_bf16():
    """True when the loaded build computes bf16 GEMMs with a bf16 dot product instruction."""
    return bool(kernels().bf16_native)


def bf16_faster_than_fp32():
    """Whether the native bf16 dot product beats fp32 FMA on this CPU: AVX512_BF16 does on
    AMD Zen 4/5 (vdpbf16ps, twice the FMA's work per cycle), not on Intel's AVX512_BF16 CPUs
    (the same rate as FMA). AMX is not used (no AMX CPU to measure it on)."""
    return native_bf16() and _import("baseline").cpu_amd()


def resolve_precision(precision):
    """("fp32" or "bf16", why) for a requested precision fp32, bf16 or auto.

    auto is bf16 only where the loaded kernels have a native bf16 dot product that is faster
    than fp32 FMA; an explicit bf16 runs anywhere (emulated where not native: same rounding of
    the GEMM inputs, slower)."""
    wanted = str(precision).strip().lower()
    if wanted not in PRECISIONS:
        raise CvaeError(f"precision {precision!r}: use fp32, bf16 or auto")
    if wanted == "fp32":
        return "fp32", "fp32 requested"
    if wanted == "bf16":
        if native_bf16():
            return "bf16", f"bf16 requested: native AVX512_BF16 ({build_name()} kernels)"
        return "bf16", (f"bf16 requested: emulated with fp32 FMA on the {build_name()} kernels "
                        "(this CPU or build has no AVX512_BF16): slower than fp32")
    if bf16_faster_than_fp32():
        return "bf16", "auto: AVX512_BF16 on AMD runs bf16 dot products at twice the fp32 FMA rate"
    if native_bf16():
        return "fp32", "auto: this CPU's AVX512_BF16 is no faster than its fp32 FMA (not AMD)"
    return "fp32", f"auto: the {build_name()} kernels have no native bf16 dot product"
