"""The `cvae` command: argparse and printing only, one module per command group over the
library (cvae.workflows, cvae.sweep, cvae.report, ...), which knows nothing of argparse.

User errors (CvaeError, bad arguments) print one line, `cvae: error: ...`, and exit 2;
Ctrl-C exits 130. Tracebacks are for bugs only.
"""

import argparse
import os
import sys

# numpy's OpenBLAS reads this when it loads (threadpoolctl only reaches libraries already
# loaded), so OpenMP (--threads) is the only pool that runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cvae  # noqa: E402
from cvae.cli import (bench, classifier, data, evaluate, export, report, sheets,  # noqa: E402
                      sweep, train)
from cvae.cli.options import Formatter, Parser  # noqa: E402
from cvae.errors import CvaeError  # noqa: E402
from cvae.kernels import build_name, kernels  # noqa: E402

#: The command groups, in the order `cvae --help` lists them.
COMMANDS = (train, data, sheets, evaluate, classifier, sweep, report, export, bench)


class VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and the kernel build in use, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"cvae {cvae.__version__} (kernels: {build_name()} build, isa {kernels().isa}; "
              f"Python {sys.version.split()[0]})")
        parser.exit(0)


def build_parser():
    parser = Parser(prog="cvae", formatter_class=Formatter,
                    description="Fast CPU trainer and generator for conditional VAEs on MNIST digits.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv=None):
    try:
        from threadpoolctl import threadpool_limits

        # OpenMP (our kernels) is the only thread pool that should run; numpy's BLAS stays at one.
        _limits = threadpool_limits(1)  # noqa: F841  (kept alive for the process)
    except Exception:
        pass
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        finalize = getattr(args, "_finalize", None)
        if finalize is not None:
            finalize(args)
        code = args.func(args)
        return 0 if code is None else int(code)
    except CvaeError as e:
        message = " ".join(str(e).split("\n"))
        print(f"cvae: error: {message}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except MemoryError:
        print("cvae: error: out of memory: choose smaller sizes (--hidden, --batch, "
              "--per-digit ...)", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("cvae: interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
