"""`cvae data fetch|verify` and `cvae info`: the MNIST files, and an architecture's size."""

import json
import os
import sys

from cvae.cli.options import add_arch_options, add_parser, add_subcommands, positive_int
from cvae.data import merge_idx_parts
from cvae.errors import CvaeError
from cvae.fetch import default_cache_dir, fetch_mnist, resolve_data_dir, verify_mnist_dir
from cvae.kernels import default_threads
from cvae.model import Model
from cvae.train import make_arch


def cmd_info(args):
    arch = make_arch(args.variant, act=args.act, hidden=args.hidden, latent=args.latent,
                     channels=args.channels)
    model = Model(arch, max_batch=args.batch, threads=args.threads)
    groups = model.slab_report()
    mb = {k: v * 4 / 1e6 for k, v in groups.items()}
    total = sum(mb.values())
    if args.json:
        print(json.dumps({"arch": arch.to_json(), "n_params": arch.n_params(), "batch": args.batch,
                          "threads": args.threads, "kernels": model.kernel_isa,
                          "slab_floats": groups, "slab_mb": mb, "total_mb": total}))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"architecture {arch.describe()}: "
                  f"[bold]{arch.n_params():,}[/bold] parameters; slab for batch {args.batch}, "
                  f"{args.threads} threads (kernels {model.kernel_isa})")
    table = Table()
    table.add_column("section")
    table.add_column("floats", justify="right")
    table.add_column("MB", justify="right")
    for name, floats in groups.items():
        table.add_row(name, f"{floats:,}", f"{mb[name]:.3f}")
    table.add_row("[bold]total[/bold]", f"{sum(groups.values()):,}", f"[bold]{total:.3f}[/bold]")
    console.print(table)
    return 0


def cmd_data_fetch(args):
    fetch_mnist(args.cache or default_cache_dir(), log=print)
    return 0


def cmd_data_verify(args):
    data_dir, source = resolve_data_dir(args.data)
    if not os.path.isdir(data_dir):
        raise CvaeError(f"MNIST data directory {data_dir} (from {source}) does not exist")
    problems = verify_mnist_dir(data_dir)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        raise CvaeError(f"{data_dir}: {len(problems)} of 4 MNIST files missing or not matching "
                        f"the published checksums")
    print(f"{data_dir} (from {source}): the 4 MNIST files match the published checksums")
    return 0


def cmd_data_merge(args):
    paths, rows, parts = merge_idx_parts(args.dir, args.split)
    print(f"merged {parts} part(s), {rows:,} digits -> {', '.join(paths)}")
    return 0


def register(subparsers):
    p = add_parser(subparsers, "info", help="parameter count and memory of an architecture",
                   description="Parameter count and the slab's size by section (MB).")
    add_arch_options(p)
    p.add_argument("--batch", type=positive_int, default=64, help="batch size the slab is sized for")
    p.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="threads (sizes the per-thread scratch)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = add_parser(subparsers, "data", help="fetch or verify the MNIST files",
                   description="Fetch MNIST into the cache, or verify a directory's files.")
    sub = add_subcommands(p, "data_command")
    q = add_parser(sub, "fetch", help="download MNIST into the cache",
                   description="Download MNIST (verified sha256) into the cache directory.")
    q.add_argument("--cache", metavar="DIR", default=None,
                   help="cache directory (default: $CVAE_CACHE, else $XDG_CACHE_HOME/cvae/mnist, "
                        "else ~/.cache/cvae/mnist)")
    q.set_defaults(func=cmd_data_fetch)
    q = add_parser(sub, "verify", help="check the MNIST files against the published checksums",
                   description="Check the four MNIST files' content sha256.")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST directory (default: $CVAE_DATA, else the cache)")
    q.set_defaults(func=cmd_data_verify)
    q = add_parser(sub, "merge", help="join the parts of a sharded 'cvae generate --format idx'",
                   description="Join DIR/parts/train-KKKK-of-NNNN-* (written by 'cvae generate "
                               "--format idx --shard K/N --out DIR') into\n"
                               "DIR/train-images-idx3-ubyte, DIR/train-labels-idx1-ubyte and "
                               "DIR/train-generated.json: the files one unsharded\nrun writes, "
                               "byte for byte. Every part must be there; the parts are left in "
                               "place.")
    q.add_argument("dir", metavar="DIR", help="the --out directory of the sharded generation")
    q.add_argument("--split", choices=("train", "test"), default="train",
                   help="which parts to join: train-* or t10k-*")
    q.set_defaults(func=cmd_data_merge)
