"""Are the peers doing cvae's work? Two checks, run in the benchmark venv:

    /work/bench-venv/bin/python benchmarks/check_peers.py [--steps 300]

1. The same model: jax_cvae and torch_cvae (fp32) train `full` from the same batches for --steps
   steps, each with its own initial weights and eps draws; the mean losses over windows of steps
   are printed side by side and must agree within 3% (they differ only by those draws).
2. The same sheets: torch_generate.py writes a few digits with a small --max-rows; its sheets are
   read back with cvae's own reader and must be exactly what cvae.images.render_sheet makes of
   their cells, with black padding cells where cvae generate pads each digit's last row.
   (cvae.images needs only NumPy, so it is imported from the repository, not installed.)
Exit code 0 when both hold, 1 otherwise.
"""
import argparse, glob, math, os, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for cvae.images

import numpy as np


def same_model(steps):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # before jax starts its pools
    import torch
    import jax_cvae, torch_cvae
    from peer_data import VARIANTS, load_mnist_np

    torch.manual_seed(0)
    torch_cvae.set_threads(1)
    x, y = load_mnist_np("train", VARIANTS["full"][3])
    step, params, state, key = jax_cvae.build("full", 64)
    model, opt = torch_cvae.make_model("full")
    rng, jl, tl = np.random.default_rng(1), [], []
    for _ in range(steps):
        idx = rng.integers(0, len(x), 64)
        params, state, key, loss = step(params, state, key, x[idx], y[idx].astype(np.int32))
        jl.append(float(loss))
        tl.append(torch_cvae.train_step(model, opt, torch.from_numpy(x[idx]), torch.from_numpy(y[idx])).item())
    ok = True
    for a, b in ((0, 1), (steps // 3, steps // 3 + 20), (steps - 20, steps)):
        j, t = np.mean(jl[a:b]), np.mean(tl[a:b])
        good = abs(j - t) <= 0.03 * t
        ok &= good
        print(f"steps {a}-{b - 1}: mean loss jax {j:.2f}, torch {t:.2f}{'' if good else '  <- differ by more than 3%'}")
    return ok


def same_sheets():
    from cvae.images import read_pgm, render_sheet

    per_digit, cols, max_rows = 30, 20, 3
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, os.path.join(HERE, "torch_generate.py"), "--per-digit", str(per_digit),
                        "--max-rows", str(max_rows), "--threads", "1", "--out", os.path.join(d, "x.pgm")], check=True)
        files = sorted(glob.glob(os.path.join(d, "x-*.pgm")))
        cells = []
        for path in files:
            image = read_pgm(path)
            rows = (image.shape[0] + 2) // 30
            sheet = np.stack([image[r * 30:r * 30 + 28, c * 30:c * 30 + 28].ravel()
                              for r in range(rows) for c in range(cols)])
            if not np.array_equal(render_sheet(sheet, cols), image):
                print(f"{path}: not the layout cvae.images.render_sheet makes")
                return False
            cells.append(sheet)
    cells = np.concatenate(cells)
    block = math.ceil(per_digit / cols) * cols  # each digit padded to whole rows, as cvae.sheets.sample_layout
    blank = np.tile(np.arange(block) >= per_digit, 10)
    expected_sheets = math.ceil(10 * block / (cols * max_rows))
    ok = (len(files) == expected_sheets and len(cells) == 10 * block and not cells[blank].any()
          and bool((cells[~blank].max(1) > 0).all()))
    print(f"torch_generate: {len(files)} sheets (expected {expected_sheets}), {len(cells)} cells, "
          f"{int(blank.sum())} blank: {'the layout of cvae generate' if ok else 'NOT the layout of cvae generate'}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    sheets = same_sheets()  # first: same_model pins this process to one CPU
    return 0 if same_model(max(a.steps, 40)) and sheets else 1


if __name__ == "__main__":
    sys.exit(main())
