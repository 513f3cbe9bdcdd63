#!/usr/bin/env bash
# Generating 100,000 digits with a run's flow prior against N(0, I): `cvae generate
# --per-digit 10000` (ten digits), alternating the two priors ROUNDS times, each its own
# process. Prints, per run, the command's wall time and what it says of sampling + decoding;
# then the medians and their ratio. Needs a run with prior.cvae (cvae train --prior flow, or
# cvae prior train). Run it on an idle machine.
#
#   benchmarks/prior_speed.sh RUN_DIR [ROUNDS] [THREADS]        (default 3 rounds, 2 threads)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: benchmarks/prior_speed.sh RUN_DIR [ROUNDS] [THREADS]}
ROUNDS=${2:-3}
THREADS=${3:-2}
OUT=$(mktemp -d)
TIMES=$(mktemp)
trap 'rm -rf "$OUT" "$TIMES"' EXIT

for round in $(seq "$ROUNDS"); do
    for prior in gaussian flow; do
        start=$(date +%s.%N)
        line=$(python -m cvae generate --checkpoint "$RUN" --per-digit 10000 --prior "$prior" \
               --threads "$THREADS" --out "$OUT/$prior.pgm")
        end=$(date +%s.%N)
        sampling=$(sed -E 's/^generated [0-9]+ digits in ([0-9.]+) s.*/\1/' <<< "$line")
        printf '%s %s %.3f %s\n' "$prior" "$round" "$(awk "BEGIN {print $end - $start}")" "$sampling"
        rm -f "$OUT"/*
    done
done | tee "$TIMES" | awk '{print "round " $2 ", " $1 ": command " $3 " s, sampling and decoding " $4 " s"}'
python - "$TIMES" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def median(prior, column):
    return statistics.median(float(r[column]) for r in rows if r[0] == prior)
for column, what in ((2, "command"), (3, "sampling and decoding")):
    g, f = median("gaussian", column), median("flow", column)
    print(f"median {what}: gaussian {g:.3f} s, flow {f:.3f} s, flow / gaussian {f / g:.2f}x")
PY
