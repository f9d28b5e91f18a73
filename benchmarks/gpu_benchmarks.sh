#!/usr/bin/env bash
# Every GPU measurement in one go, for a short lease on a GPU machine, most wanted first:
#   sizes           the 8 FLARE case sizes through predict.sh on the shipped default model, beside nnU-Net's
#                   nnUNetPredictor on the same model and 3 of the cases, whole-device GPU memory sampled by
#                   the efficiency harness (benchmarks/bench_flare_sizes.py)
#   representative  the same on a FLARE24-winner-sized model (random weights)
#   batch           12 phantoms in one process, sequential and pipelined (and on a Ray worker where Ray is
#                   installed), with NVML's GPU utilisation (benchmarks/bench_batch.py)
#   load            model load to the device, ours and nnUNetPredictor's (benchmarks/bench_model_load.py)
#   memory          one forward pass by patch and precision, two allocator settings (gpu_forward_memory.py)
#   calibrate       the default model's speed settings measured on CUDA against nnU-Net's tiling in fp32, every
#                   candidate in fp16 autocast, 4 validation phantoms (benchmarks/calibrate_default_model.py
#                   --device cuda); models/default/inference.json, now holding a cuda record beside the cpu one,
#                   comes back in results.tar.gz to be committed
# STEPS picks some (default: all, in this order). All of them may run past the device tool's 10 minutes a
# command; two calls fit (each makes the phantoms it needs again):
#
#     OUT=/tmp/gpu STEPS="sizes representative" bash benchmarks/gpu_benchmarks.sh
#     OUT=/tmp/gpu STEPS="batch load memory" bash benchmarks/gpu_benchmarks.sh
#
# Runs with the machine's python3 (PYTHON to override), which must have torch with CUDA, pandas,
# matplotlib, psutil and nvidia-ml-py; the packages it lacks travel in .whl/ (scripts/device_env.sh;
# scripts/device_wheels.sh packs the engine's; nnU-Net, the peer, needs an archive of its own). Results:
# results/flare_sizes_*, results/batch_throughput_*, results/model_load_*, results/gpu_forward_memory*;
# tarballs of them and of the harness folders (no masks) land in $OUT after each step.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_benchmarks}
STEPS=${STEPS:-sizes representative batch load memory calibrate}
mkdir -p "$OUT"
# shellcheck source=../scripts/device_env.sh
source scripts/device_env.sh
PEER_CASES="flare_z055 flare_z215 flare_z554"

collect() {  # two files, however many results: the device tool brings back at most 8
  tar -czf "$OUT/results.tar.gz" results/flare_sizes_* results/gpu_forward_memory* results/batch_throughput_* \
    results/model_load_* results/calibration_default_cuda_* models/default/inference.json 2>/dev/null
  tar -czf "$OUT/runs.tar.gz" --exclude=predictions --exclude=work --exclude='*.pth' data/flare_sizes_runs \
    2>/dev/null
}

forward_memory() {
  local tag
  tag="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-").lower())')_$(date -u +%F)"
  mkdir -p results/gpu_forward_memory
  "$PYTHON" benchmarks/gpu_forward_memory.py --representative --out "results/gpu_forward_memory/representative_$tag.json"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PYTHON" benchmarks/gpu_forward_memory.py --representative \
    --out "results/gpu_forward_memory/representative_expandable_$tag.json"
  "$PYTHON" benchmarks/gpu_forward_memory.py --patches 48 64 96 --out "results/gpu_forward_memory/default_$tag.json"
  "$PYTHON" benchmarks/gpu_forward_memory.py --render results/gpu_forward_memory/*_"$tag".json \
    --markdown results/gpu_forward_memory.md >/dev/null
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import torch, SimpleITK, cc3d, nnunetv2; print(torch.__version__, torch.cuda.get_device_name())" \
  || exit 1
start=$(date +%s)
"$PYTHON" -m phantoms --out data/flare_sizes --cases 0 --seed 0 --flare-sizes --no-progress || exit 1
echo "phantoms: $(($(date +%s) - start)) s"
for step in $STEPS; do
  case $step in
    # shellcheck disable=SC2086
    sizes) timeout 240 "$PYTHON" benchmarks/bench_flare_sizes.py --backends torch --device cuda --timeout 120 \
             --peer-python "$PYTHON" --peer-cases $PEER_CASES ;;
    # shellcheck disable=SC2086
    representative) timeout 300 "$PYTHON" benchmarks/bench_flare_sizes.py --backends torch --device cuda \
             --timeout 120 --representative --peer-python "$PYTHON" --peer-cases $PEER_CASES ;;
    # how busy the pipelined loop keeps the GPU (issue 25's goal: >= 80 %)
    batch) timeout 150 "$PYTHON" benchmarks/bench_batch.py --device cuda --cases 12 --nnunet-python none ;;
    load) timeout 240 "$PYTHON" benchmarks/bench_model_load.py --device cuda --repeats 2 \
             --nnunet-python "$(command -v "$PYTHON")" --work data/model_load ;;
    memory) forward_memory ;;
    calibrate) timeout 300 "$PYTHON" benchmarks/calibrate_default_model.py --device cuda --cases 4 ;;
    *) echo "gpu_benchmarks: unknown step '$step' (sizes representative batch load memory calibrate)" >&2
       exit 2 ;;
  esac
  collect
  echo "$step done: $(($(date +%s) - start)) s"
done
