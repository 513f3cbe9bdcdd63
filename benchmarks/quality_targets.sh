#!/usr/bin/env bash
# The quality targets of issue #6, side by side, from scratch (about 15 minutes on 2 cores):
#
#   cvae full, 10 and 30 epochs, default (progressive) schedule
#   the PyTorch reference (benchmarks/torch_cvae.py), same model, batch 64, constant β = 1,
#   30 epochs, its weights saved every epoch so `cvae eval` measures it with the same code
#
# then `cvae eval` (k = 100, 1,000 samples per digit, the shipped classifier) of each at
# temperature 1 and 0.7. Prints one line per model and temperature; the JSON of every eval is
# kept in OUT. Needs torch (pip install torch==2.13.0) and the MNIST files in $CVAE_DATA.
#
#   CVAE_DATA=../shared/data/mnist benchmarks/quality_targets.sh [OUT]   (default runs/targets)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CVAE_DATA:?set CVAE_DATA to the MNIST directory}"
OUT=${1:-runs/targets}
THREADS=${THREADS:-2}
mkdir -p "$OUT"

train_cvae() {  # NAME EPOCHS
    [ -f "$OUT/$1/last.cvae" ] && return 0
    python -m cvae train --variant full --epochs "$2" --threads "$THREADS" --out "$OUT/$1" \
        --json --no-images > "$OUT/$1.train.jsonl"
}

train_cvae cvae-30 30
train_cvae cvae-10 10
if [ ! -f "$OUT/torch-ref/epoch-0030.cvae" ]; then
    python benchmarks/torch_cvae.py train --variant full --epochs 30 --batch 64 --beta 1 \
        --threads "$THREADS" --seed 0 --json --save-cvae "$OUT/torch-ref" > "$OUT/torch-ref.train.jsonl"
fi

evaluate() {  # LABEL CHECKPOINT
    for t in 0.7 1; do
        python -m cvae eval --checkpoint "$2" --temperature "$t" --threads "$THREADS" --json \
            > "$OUT/$1.eval-t$t.json"
        python - "$1" "$OUT/$1.eval-t$t.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
worst = min(r["cond_accuracy_per_digit"].items(), key=lambda kv: kv[1])
print(f"{sys.argv[1]:>18}: -ELBO {r['neg_elbo']:.2f}  IWAE(k={r['k']}) {r['iwae_nll']:.2f}  "
      f"SSIM {r['ssim']:.4f}  T={r['temperature']:g}: cond. accuracy {100 * r['cond_accuracy']:.1f}% "
      f"(lowest: digit {worst[0]} {100 * worst[1]:.1f}%)  FID {r['fid']:.2f} "
      f"(floor {r['fid_test_floor']:.2f})  [{r['seconds']:.1f} s]")
EOF
    done
}

evaluate cvae-30 "$OUT/cvae-30/last.cvae"
evaluate cvae-10 "$OUT/cvae-10/last.cvae"
evaluate torch-ref-30 "$OUT/torch-ref/epoch-0030.cvae"
evaluate torch-ref-10 "$OUT/torch-ref/epoch-0010.cvae"
