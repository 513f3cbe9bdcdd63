"""`cvae export RUN --out FILE.cvae`: a run's weights without the optimizer's state."""

import os

from cvae.cli.options import add_parser
from cvae.workflows import export


def cmd_export(args):
    paths = export(args.run, args.out, with_prior=args.with_prior)
    sizes = ", ".join(f"{p} ({os.path.getsize(p) / 1e6:.1f} MB)" for p in paths)
    print(f"exported -> {sizes}")
    return 0


def register(subparsers):
    p = add_parser(
        subparsers, "export", help="a run's weights alone, for generate, eval and report",
        description="Write the weights of a run's newest checkpoint (or of a given .cvae file)\n"
                    "without Adam's state: about a third of the size, and what 'generate',\n"
                    "'eval', 'reconstruct', 'interpolate' and 'report' need. It cannot be resumed.\n"
                    "--with-prior also writes the run's flow prior (prior.cvae) beside it, so\n"
                    "'generate --checkpoint FILE.cvae' samples from the flow as the run does.\n"
                    "Existing files are never replaced.")
    p.add_argument("run", metavar="RUN", help="a run directory, or a .cvae checkpoint")
    p.add_argument("--out", required=True, metavar="FILE.cvae", help="the file to write")
    p.add_argument("--with-prior", action="store_true",
                   help="also write the run's complete flow prior as prior.cvae beside FILE")
    p.set_defaults(func=cmd_export)
