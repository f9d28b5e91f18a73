#!/usr/bin/env bash
# Installs the CPU build of torch 2.13.0 into the virtual environment whose python is $1, asked for by its local
# version (+cpu) so that no source can hand over the CUDA build (a plain `torch==2.13.0` from PyPI is several GB of
# CUDA packages): PyTorch's CPU wheel index first, then whatever this machine's pip configuration offers (a local
# wheel folder), else stop and say why. Shared by setup.sh (.venv) and setup_nnunet_env.sh (.venv-nnunet).
set -euo pipefail
VENV_PYTHON=$1
TORCH_CPU="torch==2.13.0+cpu"
if [ "$("$VENV_PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)" = "2.13.0+cpu" ]; then
  exit 0
fi
PIP="$VENV_PYTHON -m pip"
if ! $PIP install -q --timeout 15 --retries 1 --index-url https://download.pytorch.org/whl/cpu \
       --extra-index-url https://pypi.org/simple "$TORCH_CPU" 2> /tmp/setup-torch-index.log \
   && ! $PIP install -q "$TORCH_CPU" 2> /tmp/setup-torch-local.log; then
  echo "install_cpu_torch.sh: no CPU build of torch 2.13.0 to install: https://download.pytorch.org/whl/cpu cannot" \
       "be reached and pip's own sources have none (see /tmp/setup-torch-*.log); not falling back to PyPI's torch," \
       "which is the CUDA build (several GB)" >&2
  exit 1
fi
