#!/bin/sh
# FLARE container entry point, run as `sh predict.sh`: every /workspace/inputs/<case>_0000.nii.gz gets a
# /workspace/outputs/<case>.nii.gz lesion mask. INPUT_DIR, OUTPUT_DIR, MODEL_DIR, DEVICE (auto|cuda|cpu),
# BACKEND (auto|torch|onnx|tensorrt), TIMINGS_JSON (stage timings file, kept out of the outputs folder),
# PYTHON and PREDICT_ARGS (extra flags for `python -m inference`) override the defaults.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
INPUT_DIR=${INPUT_DIR:-/workspace/inputs}
OUTPUT_DIR=${OUTPUT_DIR:-/workspace/outputs}
MODEL_DIR=${MODEL_DIR:-$HERE/models/default}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON=$HERE/.venv/bin/python; else PYTHON=python3; fi
fi
cd "$HERE"
# PREDICT_ARGS is split into words on purpose: it carries several flags.
# shellcheck disable=SC2086
exec "$PYTHON" -m inference -i "$INPUT_DIR" -o "$OUTPUT_DIR" -m "$MODEL_DIR" \
  --device "${DEVICE:-auto}" --backend "${BACKEND:-auto}" \
  ${TIMINGS_JSON:+--timings "$TIMINGS_JSON"} ${PREDICT_ARGS:-}
