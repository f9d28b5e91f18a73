#!/usr/bin/env bash
# The main job on the embedded default model: phantoms -> predict.sh -> run_metrics -> a per-case table, the
# summary, and pictures of every case (truth and prediction outlined on the CT).
# CASES (default 4), SEED (default 7: not a training seed), DATA (default data/demo), DEVICE (auto|cpu|cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/demo}
PY=.venv/bin/python
rm -rf "$DATA"
"$PY" -m phantoms --out "$DATA" --cases "${CASES:-4}" --seed "${SEED:-7}"
INPUT_DIR="$DATA/images" OUTPUT_DIR="$DATA/predictions" DEVICE="${DEVICE:-auto}" \
  TIMINGS_JSON="$DATA/timings.json" sh predict.sh
"$PY" -m evaluation.run_metrics --gt "$DATA/labels" --pred "$DATA/predictions" -o "$DATA/metrics.csv" \
  --timings "$DATA/timings.json" --overlays "$DATA/overlays" --no-progress
echo "masks: $DATA/predictions/  CT and truth: $DATA/images/, $DATA/labels/  pictures: $DATA/overlays/"
