#!/bin/sh
# Training throughput of this checkout against another one (e.g. main before a kernel change),
# interleaved: `cvae bench --json` alternates between the two ROUNDS times, the order turning
# each round, so a noisy neighbour and any after-effect of the previous run hit both alike;
# quote the best and the median of each.
#
#   CVAE_DATA=/path/to/mnist benchmarks/compare_checkouts.sh OTHER_CHECKOUT [ROUNDS] [VARIANT] [PRECISION] [STEPS]
#   (defaults: 4 rounds, full, fp32, 300 timed steps)
#
# Each checkout runs with its own .venv (an editable install of itself). Prints one line per
# run ("<checkout> round <i>: <JSON of cvae bench>"), then per checkout and thread count the
# best and the median img/s.
set -eu
OTHER=${1:?usage: compare_checkouts.sh OTHER_CHECKOUT [ROUNDS] [VARIANT] [PRECISION] [STEPS]}
ROUNDS=${2:-4}
VARIANT=${3:-full}
PRECISION=${4:-fp32}
STEPS=${5:-300}
HERE=$(cd "$(dirname "$0")/.." && pwd)
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
i=1
while [ "$i" -le "$ROUNDS" ]; do
    if [ $((i % 2)) -eq 1 ]; then order="$OTHER $HERE"; else order="$HERE $OTHER"; fi
    for tree in $order; do
        (cd "$tree" && .venv/bin/python -m cvae bench --variant "$VARIANT" --batch 64 \
            --threads 1,2 --repeat 1 --steps "$STEPS" --warmup 30 --precision "$PRECISION" \
            --json) | sed "s|^|$tree round $i: |"
    done
    i=$((i + 1))
done | tee "$LOG"
python3 - "$LOG" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    tree, record = line.split(" round ", 1)
    record = json.loads(record.split(": ", 1)[1])
    runs.setdefault((tree, record["threads"]), []).append(record["img_per_s"])
for (tree, threads), values in sorted(runs.items()):
    print(f"{tree} {threads} thread(s): best {max(values):,.0f}, median "
          f"{statistics.median(values):,.0f} img/s over {len(values)} runs")
PY
