"""Builds cvae/_kernels.pyx once per ISA level, each as its own extension module.

x86-64: _kernels_base (-march=x86-64), _kernels_v3 (-march=x86-64-v3), _kernels_v4
(-march=x86-64-v4) and _kernels_v4bf16 (x86-64-v4 plus AVX512_BF16: the bf16 GEMMs run on
vdpbf16ps); cvae.kernels picks one at import from the CPU's features. Never
-march=native: the wheel and the binary must run on other CPUs than the build machine's.
Elsewhere: _kernels_base only, with the compiler's defaults.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ISA_FLAGS = {
    "base": ["-march=x86-64", "-mtune=generic"],
    "v3": ["-march=x86-64-v3", "-mtune=generic"],
    "v4": ["-march=x86-64-v4", "-mprefer-vector-width=512", "-mtune=generic"],
    "v4bf16": ["-march=x86-64-v4", "-mavx512bf16", "-mprefer-vector-width=512", "-mtune=generic"],
}
if platform.machine().lower() not in ("x86_64", "amd64"):
    ISA_FLAGS = {"base": []}

COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=gnu11"]
HERE = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join("build", "kernels_src")


def require_openmp(compiler_cmd):
    """Fail the build with a fix, rather than produce slow or broken kernels."""
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        c_file = os.path.join(tmp, "omp_check.c")
        with open(c_file, "w") as f:
            f.write(src)
        cmd = [compiler_cmd, "-fopenmp", c_file, "-o", os.path.join(tmp, "omp_check")]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            sys.exit(f"cvae build: no C compiler '{compiler_cmd}' found. Install gcc (Debian: apt-get install gcc).")
        if result.returncode != 0:
            sys.exit(
                "cvae build: the C compiler cannot build OpenMP code (-fopenmp failed).\n"
                "Install gcc with libgomp (Debian: apt-get install gcc libgomp1).\n" + result.stderr
            )


def kernel_sources():
    """One copy of _kernels.pyx per ISA: Cython names a module after its .pyx file."""
    os.makedirs(GENERATED, exist_ok=True)
    src = os.path.join("cvae", "_kernels.pyx")
    paths = {}
    for isa in ISA_FLAGS:
        dst = os.path.join(GENERATED, f"_kernels_{isa}.pyx")
        with open(src) as f:
            text = f.read()
        if not os.path.exists(dst) or open(dst).read() != text:
            with open(dst, "w") as f:
                f.write(text)
        paths[isa] = dst
    return paths


class BuildExt(build_ext):
    def run(self):
        cc = os.environ.get("CC", "gcc").split()[0]
        require_openmp(cc)
        super().run()


def extensions():
    from Cython.Build import cythonize

    exts = [
        Extension(
            f"cvae._kernels_{isa}",
            [path],
            include_dirs=[os.path.join(HERE, "cvae")],
            depends=[os.path.join("cvae", "cvae_simd.h")],  # Cython does not track the header
            extra_compile_args=COMMON_FLAGS + ISA_FLAGS[isa],
            extra_link_args=["-fopenmp"],
        )
        for isa, path in kernel_sources().items()
    ]
    return cythonize(exts, compiler_directives={"language_level": 3}, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
