"""`cvae bench`: training throughput per variant, batch size and thread count."""

import json

from cvae.bench import parse_int_list, run_bench
from cvae.atomic import check_writable, write_bytes_atomic
from cvae.cli.options import add_parser, add_precision
from cvae.errors import CvaeError
from cvae.fetch import resolve_data_dir
from cvae.kernels import build_name
from cvae.model import ACTIVATIONS, VARIANTS
from cvae.plots import scaling_png


def cmd_bench(args):
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise CvaeError(f"--variant {v!r}: choose from {', '.join(VARIANTS)}")
    batches = parse_int_list(args.batch, "--batch")
    threads_list = parse_int_list(args.threads, "--threads")
    if args.steps <= 0 or args.warmup < 0 or args.repeat <= 0:
        raise CvaeError("--steps and --repeat must be positive and --warmup not negative")
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise CvaeError(f"--plot {args.plot}: the picture is a .png file")
        check_writable(args.plot)
    data_dir, _ = resolve_data_dir(args.data)
    rows = []
    results = run_bench(variants, batches, threads_list, args.steps, args.warmup, args.repeat,
                        data_dir, act=args.act, precision=args.precision)
    if args.json:
        for row in results:
            rows.append(row)
            print(json.dumps(row), flush=True)
    else:
        rows = list(results)
        print_table(rows, args)
    if args.plot is not None:
        write_bytes_atomic(args.plot, scaling_png(rows, title=(
            f"cvae bench: {build_name()} kernels, {rows[0]['precision']}, median of "
            f"{args.repeat} interleaved runs of {args.steps} steps")))
        if not args.json:
            print(f"scaling picture -> {args.plot}")
    return 0


def print_table(rows, args):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cvae bench ({build_name()} kernels, {args.steps} timed steps "
                        f"after {args.warmup}, median of {args.repeat})")
    for col in ("variant", "batch", "precision", "threads", "img/s", "speed-up", "efficiency",
                "serial fraction"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["variant"], str(row["batch"]), row["precision"], str(row["threads"]),
                      f"{row['img_per_s']:,.0f}",
                      f"{row['speedup']:.2f}x" if row["speedup"] else "-",
                      f"{row['efficiency']:.0%}" if row["efficiency"] else "-",
                      f"{row['serial_fraction']:.3f}" if row["serial_fraction"] is not None
                      else "-")
    Console().print(table)


def register(subparsers):
    p = add_parser(
        subparsers, "bench", help="measure training throughput (img/s) per thread count",
        description="Train on real MNIST for a fixed number of steps and report img/s, "
                    "speed-up over 1 thread and parallel efficiency.")
    p.add_argument("--variant", default="full", help="variant(s), comma-separated")
    p.add_argument("--batch", default="64", help="batch size(s), comma-separated")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved repeats; the median is reported")
    p.add_argument("--act", choices=ACTIVATIONS, default="elu", help="hidden activation")
    p.add_argument("--data", help="MNIST directory (default: $CVAE_DATA, else the cache)")
    add_precision(p, "fp32", "the training's GEMMs")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw img/s and the speed-up against threads, with the ideal line")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (with speed-up, parallel efficiency and the "
                        "Karp–Flatt serial fraction when 1 thread is measured first)")
    p.set_defaults(func=cmd_bench)
