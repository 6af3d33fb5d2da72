#!/usr/bin/env bash
# One stage of a lent GPU's session (benchmarks/device_session.py): one command each, well
# under the device tool's 10 minutes, every row written to $OUT/<stage>.jsonl as measured.
# Runs from a checkout without the C++ extension, as on the lent H100/H200:
#   bash benchmarks/gpu_session.sh goals         # goal rows + baselines, ViT-S step
#   bash benchmarks/gpu_session.sh correctness   # kernels vs the fp64 reference, goal shapes
#   bash benchmarks/gpu_session.sh rest          # every other row, then smsd check
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash benchmarks/gpu_session.sh goals|correctness|rest}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu-$stage.txt" 2>&1
# 240 s of items, then the stage stops starting new ones; the timeout is the backstop
timeout 280 python3 benchmarks/device_session.py --stage "$stage" --out "$out" --budget-s 240
