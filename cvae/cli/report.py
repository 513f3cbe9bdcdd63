"""`cvae report RUN_DIR`: one self-contained HTML page of a run."""

import shlex

from cvae.cli.options import add_parser, add_threads
from cvae.report import write_report


def cmd_report(args):
    path, report = write_report(args.run_dir, out=args.out, data=args.data, threads=args.threads)
    for text in report.notes:
        print(f"note: {text}")
    print(f"report ({report.images} picture(s)) -> {path}\n"
          f"open it in any browser, e.g.: xdg-open {shlex.quote(path)}")
    return 0


def register(subparsers):
    p = add_parser(
        subparsers, "report",
        help="one self-contained HTML page of a run: metrics, curves, latent space, digit sheets",
        description="Write RUN_DIR/report.html: a summary, the test-set metrics of eval.json (from\n"
                    "'cvae eval --checkpoint RUN_DIR'), the last epoch's training metrics, the\n"
                    "training curves (curves.png), the latent means' PCA (latent.png), every digit\n"
                    "sheet (*.pgm, captioned from its sidecar) and the configuration (config.json).\n"
                    "A missing curves.png is drawn from metrics.jsonl; a missing latent.png from the\n"
                    "newest checkpoint and the MNIST test files (--data, else $CVAE_DATA, else the\n"
                    "cache), and both are saved in the run directory too. A run with a flow prior\n"
                    "(prior.cvae) shows samples.pgm (N(0, I)) and samples-flow.pgm (the flow prior)\n"
                    "side by side, each with its prior's figures from eval.json; a missing\n"
                    "samples-flow.pgm is drawn from the newest checkpoint and prior.cvae.\n\n"
                    "Open the report in any web browser, e.g.\n"
                    "    xdg-open RUN_DIR/report.html      (or: firefox RUN_DIR/report.html)\n"
                    "It is one self-contained file (pictures embedded as data: URIs, no scripts,\n"
                    "nothing loaded from elsewhere), so it can be copied or mailed on its own.")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run directory (cvae train --out): holds config.json or a checkpoint")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="where to write the page (default: RUN_DIR/report.html)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST directory with the test files, to draw a missing latent.png "
                        "(default: $CVAE_DATA, else the cache; without them the report says "
                        "latent.png is missing)")
    add_threads(p, help="OpenMP threads for encoding the test set and drawing a missing "
                        "samples-flow.pgm (default: the CPUs available to this process)")
    p.set_defaults(func=cmd_report)
