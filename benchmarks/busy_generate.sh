#!/bin/sh
# `cvae generate` on a busy machine: with BUSY shell loops keeping cores busy, time the whole
# generate process, alternating libgomp's default spin (GOMP_SPINCOUNT=300000 in the
# environment, which cvae leaves alone: what generate did before its threads slept when
# waiting) with generate as it is (OpenMP threads sleep as soon as they wait, see
# cvae.kernels.sleep_when_waiting). BUSY=0 measures the idle machine.
#
#   benchmarks/busy_generate.sh RUN [BUSY] [ROUNDS] [PER_DIGIT] [THREADS] [-- generate options]
#   benchmarks/busy_generate.sh runs/main 2 3 10000 2 -- --prior gaussian
#
# Prints one line per run and, per mode, the best and the median wall seconds.
set -eu
run=$1
busy=${2:-2}
rounds=${3:-3}
per_digit=${4:-10000}
threads=${5:-2}
shift $(( $# < 5 ? $# : 5 ))
[ "${1:-}" = "--" ] && shift
cvae=${CVAE:-cvae}
work=$(mktemp -d)
pids=""
cleanup() {
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
i=0
while [ "$i" -lt "$busy" ]; do
    sh -c 'while :; do :; done' &
    pids="$pids $!"
    i=$((i + 1))
done
one() {  # mode, then env assignments; prints the wall seconds
    mode=$1
    shift
    rm -rf "$work/out" && mkdir "$work/out"
    start=$(date +%s.%N)
    env "$@" "$cvae" generate --checkpoint "$run" --per-digit "$per_digit" --threads "$threads" \
        --out "$work/out/x.pgm" ${extra} > /dev/null
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", b - a }'
}
extra="$*"
: > "$work/spin" && : > "$work/sleep"
r=1
while [ "$r" -le "$rounds" ]; do
    # alternate which goes first
    if [ $((r % 2)) -eq 1 ]; then order="spin sleep"; else order="sleep spin"; fi
    for mode in $order; do
        if [ "$mode" = spin ]; then s=$(one spin GOMP_SPINCOUNT=300000); else s=$(one sleep); fi
        echo "round $r busy $busy $mode: $s s"
        echo "$s" >> "$work/$mode"
    done
    r=$((r + 1))
done
for mode in spin sleep; do
    sort -n "$work/$mode" | awk -v m="$mode" -v b="$busy" '{ v[NR] = $1 } END {
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        label = (m == "spin") ? "default spin (GOMP_SPINCOUNT=300000)" : "threads sleep when waiting"
        printf "busy %d, %s: best %.3f s, median %.3f s\n", b, label, v[1], med }'
done
