#!/usr/bin/env bash
# Creates .venv with everything the engine, the evaluation harness and the tests need, CPU only.
# Safe to re-run. Never pulls the CUDA build of torch: torch is pinned to its CPU build (+cpu) and
# dynamic-network-architectures is installed without its (timm -> torchvision -> CUDA torch) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch: the CPU build, never the CUDA one (scripts/install_cpu_torch.sh says how)
bash scripts/install_cpu_torch.sh .venv/bin/python
$PIP install -q -r requirements-dev.txt
$PIP install -q --no-deps -r requirements-nodeps.txt
# The project itself, editable: `inference`, `evaluation`, `phantoms`, ... import from any folder, and the
# flare-* commands exist. --no-deps: its dependencies are the pinned ones above.
$PIP install -q --no-deps --no-build-isolation -e .
if .venv/bin/python -m pip list 2>/dev/null | grep -qiE '^nvidia-(cu|nccl|nvjit)'; then
  echo "setup.sh: a CUDA package was pulled into .venv; refusing to continue" >&2
  exit 1
fi
# `pip check` names one thing on purpose: dynamic-network-architectures' timm, left out (see above).
if ! problems=$(.venv/bin/python -m pip check 2>&1); then
  unexpected=$(echo "$problems" | grep -v '^dynamic-network-architectures .* requires timm' || true)
  if [ -n "$unexpected" ]; then
    echo "setup.sh: pip check: $unexpected" >&2
  fi
fi
# dciodvfy (Debian's dicom3tools): validates the DICOM SEG objects the tests write (tests/test_dicom.py); installed
# where this runs as root with apt-get, else those checks skip, naming the reason
if ! command -v dciodvfy > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  apt-get install -y -q dicom3tools > /dev/null 2>&1 || { apt-get update -q > /dev/null 2>&1 &&
    apt-get install -y -q dicom3tools > /dev/null 2>&1; } || echo "setup.sh: dicom3tools not installed" >&2
fi
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
# nnU-Net v2 itself, beside us (.venv-nnunet): the peer of the parity tests (tests/test_nnunet_parity.py, which
# CI requires) and of benchmarks/parity_nnunet.py. SKIP_NNUNET_ENV=1 leaves it out (those tests then skip).
if [ "${SKIP_NNUNET_ENV:-}" != 1 ]; then
  bash scripts/setup_nnunet_env.sh
fi
