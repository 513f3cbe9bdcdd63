#!/bin/sh
# fp32 training throughput of this checkout against another one (e.g. main before a kernel
# change), interleaved: `cvae bench --json` alternates between the two ROUNDS times, so a noisy
# neighbour hits both alike; quote the best and the median of each.
#
#   CVAE_DATA=/path/to/mnist benchmarks/compare_checkouts.sh /work/main 4
#
# Each checkout runs with its own .venv (an editable install of itself).
set -eu
OTHER=${1:?usage: compare_checkouts.sh OTHER_CHECKOUT [ROUNDS]}
ROUNDS=${2:-4}
HERE=$(cd "$(dirname "$0")/.." && pwd)
i=1
while [ "$i" -le "$ROUNDS" ]; do
    for tree in "$OTHER" "$HERE"; do
        (cd "$tree" && .venv/bin/python -m cvae bench --variant full --batch 64 --threads 1,2 \
            --repeat 1 --steps 300 --warmup 30 --json) | sed "s|^|$tree round $i: |"
    done
    i=$((i + 1))
done
