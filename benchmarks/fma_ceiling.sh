#!/usr/bin/env bash
# Pure-register AVX-512 FMA throughput on 1 and 2 threads, alternating, ROUNDS times:
# the scaling ceiling of the machine at the moment of measurement (see fma_ceiling.c).
set -euo pipefail
rounds=${1:-5}
exe=$(mktemp)
trap 'rm -f "$exe"' EXIT
gcc -O2 -fopenmp -march=x86-64-v4 -mprefer-vector-width=512 "$(dirname "$0")/fma_ceiling.c" -o "$exe"
for _ in $(seq "$rounds"); do
    for t in 1 2; do OMP_NUM_THREADS=$t "$exe"; done
done
