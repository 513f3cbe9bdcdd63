"""Entry point of the frozen `cvae` binary (PyInstaller): the same as the `cvae` command.

numpy's OpenBLAS gets one thread before numpy is first imported, so that the kernels'
OpenMP pool (--threads N) is the only one that runs; cli.main() caps it with threadpoolctl
as well, but that only reaches libraries already loaded.
"""

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"

import sys  # noqa: E402

from cvae.cli import main  # noqa: E402

sys.exit(main())
