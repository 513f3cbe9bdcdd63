"""Training throughput on real data, per thread count, variant and batch size (`cvae bench`).

Steady state only: the first --warmup steps of every run are not timed. With --repeat R the
thread counts are interleaved R times (1, 2, 1, 2, ...) and the median is reported, so a
noisy neighbour on a small machine hits every configuration alike.
"""

import statistics
import time

from cvae.data import BatchStream, Dataset
from cvae.errors import CvaeError
from cvae.kernels import build_name, resolve_precision
from cvae.model import VARIANTS, Model, arch_for_variant


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


def karp_flatt(speedup, threads):
    """The Karp–Flatt metric: the serial fraction e = (1/S − 1/p) / (1 − 1/p) that would
    explain speed-up S on p threads by Amdahl's law (None for p = 1 or no speed-up). A
    fraction that grows with p points at overhead (barriers, memory bandwidth), not at serial
    code."""
    if not speedup or threads <= 1:
        return None
    return round((1 / speedup - 1 / threads) / (1 - 1 / threads), 4)


def run_bench(variants, batches, threads_list, steps, warmup, repeat, data_dir, act="elu",
              precision="fp32"):
    """Yield one result dict per (variant, batch, threads): medians over `repeat` runs.

    ``precision``: fp32, bf16 or auto (resolved by cvae.kernels.resolve_precision; the rows
    say which ran)."""
    precision, _ = resolve_precision(precision)
    datasets = {}
    for variant in variants:
        for batch in batches:
            digits = VARIANTS[variant]["digits"]
            if digits not in datasets:
                datasets[digits] = Dataset.load(data_dir, "train", digits)
            dataset = datasets[digits]
            if len(dataset) < batch:
                raise CvaeError(f"--batch {batch} is larger than the {len(dataset)} training images")
            arch = arch_for_variant(variant, act=act)
            models = {t: Model(arch, max_batch=batch, threads=t, precision=precision)
                      for t in threads_list}
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
                    "serial_fraction": karp_flatt(speedup, t),
                    "steps": steps, "warmup": warmup, "kernels": build_name(),
                    "precision": precision,
                }
