"""Decode N(0, I) draws of the `full` CVAE decoder (random weights: the point is the work) with
their labels and write them as PGM sheets of cvae generate's geometry (28x28 cells, gutter 2,
each digit starting a row, --max-rows rows per sheet, NAME-0001.pgm, ...). The plain script a
PyTorch user would write: no sidecars, no fsync. See benchmarks/README.md.

    python benchmarks/torch_generate.py --per-digit 10000 --threads 2 --out DIR/x.pgm
"""
import argparse, math, os, time, torch
from torch_cvae import VARIANTS, CVAE, set_threads

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--variant", choices=VARIANTS, default="full")
p.add_argument("--per-digit", type=int, default=10)
p.add_argument("--cols", type=int, default=None, help="default: min(per-digit, 20), as cvae generate")
p.add_argument("--max-rows", type=int, default=50)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", required=True)
a = p.parse_args()
t0 = time.perf_counter()  # after the imports: the whole process is what compare_generate times
set_threads(a.threads)
h1, h2, latent, digits = VARIANTS[a.variant]
cols, per = a.cols or min(a.per_digit, 20), a.per_digit
block = math.ceil(per / cols) * cols                       # a digit's cells, padded to whole rows
with torch.no_grad():
    dec = CVAE(h1, h2, latent).dec
    cells = torch.zeros(len(digits), block, 28, 28, dtype=torch.uint8)   # blank padding stays black
    for i, d in enumerate(digits):
        c = torch.nn.functional.one_hot(torch.full((per,), d), 10).float()
        prob = torch.sigmoid(dec(torch.cat([torch.randn(per, latent), c], 1)))
        cells[i, :per] = (prob * 255).round().to(torch.uint8).view(per, 28, 28)
cells = cells.view(-1, 28, 28)
step = a.max_rows * cols
stem, ext = os.path.splitext(a.out)
for s, start in enumerate(range(0, len(cells), step), 1):
    sheet = cells[start:start + step]
    rows = math.ceil(len(sheet) / cols)
    grid = torch.zeros(rows * cols, 30, 30, dtype=torch.uint8)
    grid[:len(sheet), :28, :28] = sheet
    canvas = grid.view(rows, cols, 30, 30).permute(0, 2, 1, 3).reshape(rows * 30, cols * 30)[:-2, :-2]
    path = a.out if len(cells) <= step else f"{stem}-{s:04d}{ext}"
    with open(path, "wb") as f:
        f.write(b"P5\n%d %d\n255\n" % (canvas.shape[1], canvas.shape[0]) + canvas.contiguous().numpy().tobytes())
print(f"decoded and wrote {per * len(digits)} digits as {s} sheet(s) in {time.perf_counter() - t0:.3f} s (imports not included)")
