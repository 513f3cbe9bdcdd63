"""`cvae bench`: training throughput on real data, per thread count, variant and batch size.

Steady state only: the first --warmup steps of every run are not timed. With --repeat R the
thread counts are interleaved R times (1, 2, 1, 2, ...) and the median is reported, so a
noisy neighbour on a small machine hits every configuration alike.
"""

import json
import statistics
import time

from cvae.data import BatchStream, Dataset
from cvae.errors import CvaeError
from cvae.fetch import resolve_data_dir
from cvae.kernels import build_name
from cvae.model import ACTIVATIONS, VARIANTS, Arch, Model


def parse_int_list(text, what):
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CvaeError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise CvaeError(f"{what}: expected positive whole numbers, got {text!r}")
    return values


def time_training(model, stream, steps, warmup, seed=0):
    """img/s over `steps` timed training steps after `warmup` untimed ones."""
    done, timed_images, start = 0, 0, None
    epoch = 0
    while done < warmup + steps:
        for pixels, labels in stream.epoch(epoch):
            if done == warmup:
                start = time.perf_counter()
            model.train_step(pixels, labels, 1e-3, 1.0, seed, done)
            if done >= warmup:
                timed_images += pixels.shape[0]
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    return timed_images / (time.perf_counter() - start)


def run_bench(variants, batches, threads_list, steps, warmup, repeat, data_dir, act="elu"):
    """Yield one result dict per (variant, batch, threads): medians over `repeat` runs."""
    datasets = {}
    for variant in variants:
        for batch in batches:
            digits = VARIANTS[variant]["digits"]
            if digits not in datasets:
                datasets[digits] = Dataset.load(data_dir, "train", digits)
            dataset = datasets[digits]
            if len(dataset) < batch:
                raise CvaeError(f"--batch {batch} is larger than the {len(dataset)} training images")
            arch = Arch.variant(variant, act=act)
            models = {t: Model(arch, max_batch=batch, threads=t) for t in threads_list}
            for model in models.values():
                model.init_params(0)
            rates = {t: [] for t in threads_list}
            for _ in range(repeat):
                for t in threads_list:
                    stream = BatchStream(dataset, batch, seed=0)
                    rates[t].append(time_training(models[t], stream, steps, warmup))
            base = statistics.median(rates[threads_list[0]]) if threads_list[0] == 1 else None
            for t in threads_list:
                img_per_s = statistics.median(rates[t])
                speedup = img_per_s / base if base else None
                yield {
                    "impl": "cvae", "variant": variant, "batch": batch, "threads": t,
                    "img_per_s": round(img_per_s, 1), "runs": [round(r, 1) for r in rates[t]],
                    "speedup": round(speedup, 3) if speedup else None,
                    "efficiency": round(speedup / t, 3) if speedup else None,
                    "steps": steps, "warmup": warmup, "kernels": build_name(),
                }


def command(args):
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise CvaeError(f"--variant {v!r}: choose from {', '.join(VARIANTS)}")
    batches = parse_int_list(args.batch, "--batch")
    threads_list = parse_int_list(args.threads, "--threads")
    if args.steps <= 0 or args.warmup < 0 or args.repeat <= 0:
        raise CvaeError("--steps and --repeat must be positive and --warmup not negative")
    data_dir, _ = resolve_data_dir(args.data)
    results = run_bench(variants, batches, threads_list, args.steps, args.warmup, args.repeat,
                        data_dir, act=args.act)
    if args.json:
        for row in results:
            print(json.dumps(row), flush=True)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cvae bench ({build_name()} kernels, {args.steps} timed steps "
                        f"after {args.warmup}, median of {args.repeat})")
    for col in ("variant", "batch", "threads", "img/s", "speed-up", "efficiency"):
        table.add_column(col, justify="right")
    for row in results:
        table.add_row(row["variant"], str(row["batch"]), str(row["threads"]),
                      f"{row['img_per_s']:,.0f}",
                      f"{row['speedup']:.2f}x" if row["speedup"] else "-",
                      f"{row['efficiency']:.0%}" if row["efficiency"] else "-")
    Console().print(table)
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "bench", help="measure training throughput (img/s) per thread count",
        description="Train on real MNIST for a fixed number of steps and report img/s, "
                    "speed-up over 1 thread and parallel efficiency.")
    p.add_argument("--variant", default="full", help="variant(s), comma-separated (default: full)")
    p.add_argument("--batch", default="64", help="batch size(s), comma-separated (default: 64)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default: 1,2)")
    p.add_argument("--steps", type=int, default=300, help="timed steps per run (default: 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (default: 30)")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved repeats; the median is reported (default: 3)")
    p.add_argument("--act", choices=ACTIVATIONS, default="elu",
                   help="hidden activation (default: elu)")
    p.add_argument("--data", help="MNIST directory (default: $CVAE_DATA, else the cache)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=command)
