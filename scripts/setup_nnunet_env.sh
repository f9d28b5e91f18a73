#!/usr/bin/env bash
# Creates .venv-nnunet: a separate, CPU-only environment with nnU-Net v2 2.8.1, the peer that
# tests/test_nnunet_parity.py (in CI) and benchmarks/parity_nnunet.py compare our engine against, and the
# trainer of training/make_nnunet_trained_model.py. scripts/setup.sh runs it; the engine never needs it.
#
# Safe to re-run. nnunetv2 and the packages whose declared dependencies lead to torch (timm ->
# torchvision -> a CUDA torch, several GB) are installed with --no-deps, and every runtime dependency
# that nnunetv2 2.8.1's METADATA (Requires-Dist) names is then installed explicitly, pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-nnunet
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build, asked for as +cpu; a bare `torch` (or a dependency resolver free to pick a newer one) would pull
# CUDA.
bash scripts/install_cpu_torch.sh "$VENV/bin/python"
# Requires-Dist of nnunetv2 2.8.1 that do not depend on torch (plus what they need at import time).
$PIP install -q \
  numpy==2.4.6 scipy==1.17.1 tqdm==4.70.1 SimpleITK==2.5.7 nibabel==5.4.2 pandas==3.1.1 \
  scikit-image==0.26.0 scikit-learn==1.9.1 einops==0.8.2 "blosc2==4.14.1" \
  matplotlib==3.11.2 seaborn==0.13.2 graphviz==0.21 requests==2.34.2 yacs==0.1.8 \
  tifffile==2026.3.3 imagecodecs==2026.3.6 \
  connected-components-3d==4.1.1 pillow==13.0.0 threadpoolctl==3.8.0
# nnunetv2 itself and the packages that declare torch (or timm -> torchvision) as a dependency: their own
# code needs only what is above. batchgenerators too: it declares `unittest2`, which Python 3 lacks.
# (pip may still print that timm, future and unittest2 are "not installed": expected.)
$PIP install -q --no-deps nnunetv2==2.8.1 \
  acvl-utils==0.2.6 dynamic-network-architectures==0.4.4 \
  batchgenerators==0.25.5 batchgeneratorsv2==0.3.6

fail() { echo "setup_nnunet_env.sh: $*" >&2; exit 1; }
if $PIP list 2>/dev/null | grep -iE 'nvidia-(cu|nccl|nvjit)'; then
  fail "CUDA packages were pulled into $VENV (listed above); delete $VENV and fix the pins"
fi
TORCH_VERSION=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)
[ "$TORCH_VERSION" = "2.13.0+cpu" ] || fail "expected torch 2.13.0+cpu in $VENV, found '$TORCH_VERSION'"
"$VENV/bin/python" - <<'EOF' || fail "nnU-Net does not import in $VENV"
import os
import nnunetv2
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: F401
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
# The predictor finds the trainer class by importing every trainer module: check that this works too.
trainer = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"),
                                      "nnUNetTrainer", "nnunetv2.training.nnUNetTrainer")
assert trainer is not None
EOF
echo "setup_nnunet_env.sh: $VENV ready (nnunetv2 2.8.1, torch $TORCH_VERSION)"
