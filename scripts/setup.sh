#!/usr/bin/env bash
# Creates .venv with everything the engine, the evaluation harness and the tests need, CPU only.
# Safe to re-run. Never pulls the CUDA build of torch: torch is pinned to the local CPU build and
# dynamic-network-architectures is installed without its (timm -> torchvision -> CUDA torch) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
$PIP install -q -r requirements-dev.txt
$PIP install -q --no-deps -r requirements-nodeps.txt
# The project itself, editable: `inference`, `evaluation`, `phantoms`, ... import from any folder, and the
# flare-* commands exist. --no-deps: its dependencies are the pinned ones above.
$PIP install -q --no-deps --no-build-isolation -e .
if .venv/bin/python -m pip list 2>/dev/null | grep -qiE '^nvidia-(cu|nccl|nvjit)'; then
  echo "setup.sh: a CUDA package was pulled into .venv; refusing to continue" >&2
  exit 1
fi
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
