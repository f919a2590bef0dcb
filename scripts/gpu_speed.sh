#!/usr/bin/env bash
# The GPU half of issue 6 in one prepared call on a lent GPU machine: the speed benchmark's GPU
# section eager, then with torch.compile (inference and the training step), so both tables come
# from the same card in the same session. Results land in $OUT.
# Usage on the GPU machine, from the repository root:  OUT=/some/dir bash scripts/gpu_speed.sh
set -u
out=${OUT:?set OUT to a folder for the results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
for mode in eager compile; do
  flag=""; [ "$mode" = compile ] && flag="--compile"
  start=$(date +%s)
  timeout 240 python3 benchmarks/speed.py --skip-cpu $flag --out "$out/speed_gpu_$mode.json" > "$out/speed_$mode.log" 2>&1
  echo "$mode: exit $? after $(( $(date +%s) - start )) s"; tail -20 "$out/speed_$mode.log"
done
