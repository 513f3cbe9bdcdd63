"""Digit sheets side by side in one PNG, for the README and results_main/ (a PNG shows in a
Markdown page where a PGM does not).

    python benchmarks/side_by_side.py --out FILE.png SHEET.pgm [SHEET.pgm ...]

The sheets (any `cvae generate` or run sheet, e.g. two runs' samples-flow.pgm) are placed left
to right in the order given, top-aligned on a white background with a 16-pixel white gutter;
their pixels are copied unchanged.
"""

import argparse
import sys

import numpy as np

from cvae.atomic import write_bytes_atomic
from cvae.errors import CvaeError
from cvae.images import png_bytes, read_pgm

GUTTER = 16


def side_by_side(sheets, gutter=GUTTER):
    height = max(s.shape[0] for s in sheets)
    width = sum(s.shape[1] for s in sheets) + gutter * (len(sheets) - 1)
    out = np.full((height, width), 255, dtype=np.uint8)
    x = 0
    for sheet in sheets:
        out[:sheet.shape[0], x:x + sheet.shape[1]] = sheet
        x += sheet.shape[1] + gutter
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("sheets", nargs="+", help="PGM sheets, left to right")
    args = p.parse_args(argv)
    try:
        picture = side_by_side([read_pgm(path) for path in args.sheets])
        write_bytes_atomic(args.out, png_bytes(picture))
    except CvaeError as e:
        print(f"side_by_side: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {picture.shape[1]}x{picture.shape[0]} from {len(args.sheets)} sheets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
