#!/usr/bin/env bash
# The quality guard of bf16 training (issue 16): the README's main command in fp32 and in
# bf16, the same seed, each with its flow prior, then `cvae eval` of each (k = 100, 1,000
# samples per digit, the shipped classifier, both priors). Prints the figures side by side:
# bf16 passes when its test -ELBO is within 0.3 nats of fp32's and the flow prior's
# conditional accuracy within 0.5 points. About 15 minutes on 2 idle cores.
#
#   CVAE_DATA=../shared/data/mnist benchmarks/precision_guard.sh [OUT]   (default runs)
#
# OUT/main is the README's main run (cvae train --variant full --epochs 30 --threads 2
# --prior flow), OUT/main-bf16 the same with --precision bf16. A finished run is not trained
# again.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CVAE_DATA:?set CVAE_DATA to the MNIST directory}"
OUT=${1:-runs}
mkdir -p "$OUT"

run() {  # NAME PRECISION
    if [ ! -f "$OUT/$1.eval.json" ]; then
        python -m cvae train --variant full --epochs 30 --threads 2 --out "$OUT/$1" \
            --prior flow --precision "$2" --json > "$OUT/$1.train.jsonl"
        python -m cvae eval --checkpoint "$OUT/$1" --json > "$OUT/$1.eval.json"
    fi
}
run main fp32
run main-bf16 bf16

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
figures = {}
for name in ("main", "main-bf16"):
    with open(f"{out}/{name}.eval.json") as f:
        e = json.load(f)
    with open(f"{out}/{name}.train.jsonl") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    cvae_s = sum(r["seconds"] for r in lines if "epoch" in r)
    flow = e["by_prior"]["flow"]
    figures[name] = (e["neg_elbo"], e["iwae_nll"], flow["cond_accuracy"], flow["fid"],
                     e["by_prior"]["gaussian"]["cond_accuracy"], cvae_s)
    print(f"{name:10s} {e['precision']}: test -ELBO {e['neg_elbo']:.3f}, IWAE {e['iwae_nll']:.3f}, "
          f"flow accuracy {100 * flow['cond_accuracy']:.2f}%, flow FID {flow['fid']:.3f}, "
          f"N(0, I) accuracy {100 * figures[name][4]:.2f}%, CVAE training {cvae_s:.1f} s")
a, b = figures["main"], figures["main-bf16"]
elbo, accuracy = b[0] - a[0], 100 * (b[2] - a[2])
print(f"bf16 - fp32: test -ELBO {elbo:+.3f} nats (guard: within 0.3), flow accuracy "
      f"{accuracy:+.2f} points (guard: within 0.5): "
      + ("PASS" if abs(elbo) <= 0.3 and abs(accuracy) <= 0.5 else "FAIL"))
PY
