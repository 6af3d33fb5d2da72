#!/usr/bin/env bash
# One prepared GPU session: correctness first, then every benchmark with its baselines in the
# same run. Runs from a checkout without the C++ extension (PYTHONPATH=.), as on the lent
# H100/H200 (torch + triton preinstalled). Writes logs and JSON rows to ${OUT:-gpu-out}.
#   bash benchmarks/gpu_session.sh [extra args for run.py, e.g. --ops masked_sample]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python -m smsd.cli check --device cuda 2>&1 | tee "$out/check.log"
check=${PIPESTATUS[0]}
python benchmarks/run.py --device cuda --out "$out" "$@" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
# Issue 9: the full training step, smsd against the plain PyTorch step (eager, compiled, loop).
TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/test_distill_step.py 2>&1 | tee "$out/train_step_tests.log"
python benchmarks/train_step.py --device cuda --preset vit_small --preset vit_base \
  --variants smsd smsd+ckpt smsd-unfused torch-eager torch-compile smsd+compile torch-loop \
  --steps 10 --warmup 3 --json "$out/train_step.json" 2>&1 | tee "$out/train_step.log"
train=${PIPESTATUS[0]}
echo "check exit $check, bench exit $bench, train step exit $train"
exit $(( check || bench || train ))
