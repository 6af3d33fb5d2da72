#!/bin/bash
# chain: list of eps values (inf = not private)
cd /work/main
for e in "$@"; do
  out=/work/dp-runs/eps-$e
  if [ "$e" = inf ]; then
    extra="--methods smsd finetune-only"
  else
    extra="--methods smsd --dp-epsilon $e"
  fi
  start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/smsd simulate $extra --membership --seeds 0 1 2 --out $out --no-progress > /work/dp-runs/eps-$e.log 2>&1
  echo "rc=$? wall_s=$(( $(date +%s) - start ))" >> /work/dp-runs/eps-$e.log
done
