# Sourced (not run) first thing by the scripts that run on a lent GPU machine (benchmarks/gpu_benchmarks.sh,
# training/gpu_train.sh). That machine has python3 with CUDA torch, numpy, scipy, pandas, matplotlib and
# nvidia-ml-py, not this project's other packages, and no network. They travel in .whl/ (the device tool's
# carry): wheels, installed with pip --no-index --target, and .tar.xz archives of an installed site-packages
# folder (scripts/device_wheels.sh makes one); both land in /tmp/site. An archive named *-cpXY.tar.xz is
# for CPython X.Y only and is skipped under another Python. The repository root on the import path stands
# for `pip install -e .`. PYTHON (default python3) is exported: predict.sh runs the engine with it.
PYTHON=${PYTHON:-python3}
python_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "error: could not install the wheels in .whl/" >&2; exit 1; }
fi
for archive in .whl/*.tar.xz; do
  [ -e "$archive" ] || continue
  case $archive in
    *-cp[0-9]*.tar.xz) [[ $archive == *-"$python_tag".tar.xz ]] || { echo "skipping $archive (not $python_tag)"; continue; } ;;
  esac
  mkdir -p /tmp/site && tar -xJf "$archive" -C /tmp/site
done
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHON PYTHONUNBUFFERED=1
