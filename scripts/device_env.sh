# Sourced (not run) first thing by the scripts that run on a lent GPU machine (benchmarks/gpu_benchmarks.sh,
# training/gpu_train.sh). That machine has python3 with CUDA torch, numpy, scipy, pandas, matplotlib and
# nvidia-ml-py, not this project's other packages, and no network. Where PYTHON (default python3) lacks them
# they come from .whl/ (the device tool's carry): wheels, installed with pip --no-index --target, or .tar.xz
# archives of an installed site-packages folder (scripts/device_wheels.sh makes one); both land in
# /tmp/site. The repository root on the import path stands for `pip install -e .`. PYTHON is exported:
# predict.sh runs the engine with it.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import SimpleITK, cc3d, dynamic_network_architectures" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { echo "error: could not install the wheels in .whl/" >&2; exit 1; }
  fi
  if compgen -G ".whl/*.tar.xz" >/dev/null; then
    mkdir -p /tmp/site
    for archive in .whl/*.tar.xz; do tar -xJf "$archive" -C /tmp/site; done
  fi
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHON PYTHONUNBUFFERED=1
