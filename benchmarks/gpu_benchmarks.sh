#!/usr/bin/env bash
# Every GPU measurement in one go, for a short lease on a GPU machine: the 8 FLARE case sizes through
# predict.sh on the shipped default model and on a FLARE24-winner-sized model (random weights), each
# beside nnU-Net's nnUNetPredictor on the same model and 3 of the cases, whole-device GPU memory sampled
# by the efficiency harness (benchmarks/bench_flare_sizes.py); then a batch of 12 phantoms, sequential and
# pipelined, with NVML's GPU utilisation (benchmarks/bench_batch.py). About 8 minutes on an H200.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_benchmarks.sh
#
# Runs with the machine's python3 (PYTHON to override), which must have torch with CUDA, pandas,
# matplotlib, psutil and nvidia-ml-py; the packages it lacks travel in .whl/ (scripts/device_env.sh;
# scripts/device_wheels.sh packs the engine's; nnU-Net, the peer, needs an archive of its own). Results: results/flare_sizes_*,
# results/batch_throughput_*, results/gpu_forward_memory*; tarballs of them and of the harness folders (no masks) land in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_benchmarks}
mkdir -p "$OUT"
# shellcheck source=../scripts/device_env.sh
source scripts/device_env.sh
PEER_CASES="flare_z055 flare_z215 flare_z554"

collect() {  # two files, however many results: the device tool brings back at most 8
  tar -czf "$OUT/results.tar.gz" results/flare_sizes_* results/gpu_forward_memory* results/batch_throughput_* \
    2>/dev/null
  tar -czf "$OUT/runs.tar.gz" --exclude=predictions --exclude=work --exclude='*.pth' data/flare_sizes_runs
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import torch, SimpleITK, cc3d, nnunetv2; print(torch.__version__, torch.cuda.get_device_name())" \
  || exit 1
start=$(date +%s)
"$PYTHON" -m phantoms --out data/flare_sizes --cases 0 --seed 0 --flare-sizes --no-progress || exit 1
echo "phantoms: $(($(date +%s) - start)) s"
# shellcheck disable=SC2086
timeout 240 "$PYTHON" benchmarks/bench_flare_sizes.py --backends torch --device cuda --timeout 120 \
  --peer-python "$PYTHON" --peer-cases $PEER_CASES
collect
echo "default model done: $(($(date +%s) - start)) s"
# shellcheck disable=SC2086
timeout 300 "$PYTHON" benchmarks/bench_flare_sizes.py --backends torch --device cuda --timeout 120 \
  --representative --peer-python "$PYTHON" --peer-cases $PEER_CASES
collect
echo "representative model done: $(($(date +%s) - start)) s"
# a batch in one process, sequential and pipelined (and on one Ray worker where Ray is installed), with NVML's
# GPU utilisation sampled: how busy the pipelined loop keeps the GPU (issue 25's goal: >= 80 %)
timeout 150 "$PYTHON" benchmarks/bench_batch.py --device cuda --cases 12 --nnunet-python none
collect
echo "batch done: $(($(date +%s) - start)) s"
# one forward pass by patch and precision, with the default allocator and with expandable segments
tag="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-").lower())')_$(date -u +%F)"
mkdir -p results/gpu_forward_memory
"$PYTHON" benchmarks/gpu_forward_memory.py --representative --out "results/gpu_forward_memory/representative_$tag.json"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PYTHON" benchmarks/gpu_forward_memory.py --representative \
  --out "results/gpu_forward_memory/representative_expandable_$tag.json"
"$PYTHON" benchmarks/gpu_forward_memory.py --patches 48 64 96 --out "results/gpu_forward_memory/default_$tag.json"
"$PYTHON" benchmarks/gpu_forward_memory.py --render results/gpu_forward_memory/*_"$tag".json \
  --markdown results/gpu_forward_memory.md >/dev/null
collect
echo "forward memory done: $(($(date +%s) - start)) s"
