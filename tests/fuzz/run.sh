#!/usr/bin/env bash
# Fuzz every target of tests/fuzz/targets.py in turn, FUZZ_SECONDS each (default 60: the CI
# run; the README's long run used 600+). Needs atheris in the active Python. New corpus inputs
# go to a scratch directory (the committed seeds are only read); a crash stops that target,
# leaves its input in $FUZZ_OUT (default: a new temp directory) and makes this script fail.
#
#   tests/fuzz/run.sh                    # every target, 60 s each
#   FUZZ_SECONDS=600 tests/fuzz/run.sh checkpoint_prior
set -uo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-60}"
out="${FUZZ_OUT:-$(mktemp -d -t cvae-fuzz-XXXXXX)}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx pgm checkpoint_cvae checkpoint_prior checkpoint_classifier rundir_json)

python -c "import atheris" || { echo "run.sh: atheris is not installed (pip install atheris)" >&2; exit 1; }
failed=()
for target in "${targets[@]}"; do
    mkdir -p "$out/$target"
    log="$out/$target.log"
    echo "fuzz $target for ${seconds}s (log: $log)"
    python fuzz.py "$target" -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="$out/$target/" -timeout=20 -rss_limit_mb=2048 \
        "$out/$target" "corpus/$target" >"$log" 2>&1
    code=$?
    grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)|DONE" "$log" \
        | sed "s/^/  /"
    if [ $code -ne 0 ]; then
        echo "  CRASH in $target (exit $code): see $log; inputs: $(ls "$out/$target" | grep -E '^(crash|timeout|oom|leak)-' | tr '\n' ' ')" >&2
        grep -A30 "Traceback\|==ERROR\|ERROR: libFuzzer" "$log" | head -40 >&2
        failed+=("$target")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "run.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "run.sh: no crash in ${#targets[@]} targets"
