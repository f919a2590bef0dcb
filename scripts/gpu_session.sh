#!/usr/bin/env bash
# One prepared call on a lent GPU machine (see README "Performance"): trains the bundled demo model with
# the full synthetic recipe, then runs the GPU section of the speed benchmark. Results land in $OUT.
# Usage on the GPU machine, from the repository root:  OUT=/some/dir bash scripts/gpu_session.sh [TIME_SCALE]
set -u
scale=${1:-1.0}
out=${OUT:?set OUT to a folder for the results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0), 'cpus', __import__('os').cpu_count())"
start=$(date +%s)
timeout 380 python3 -m clipcount synthetic recipe /tmp/recipe-full --preset full --time-scale "$scale" \
  --export-demo clipcount/assets --quiet > "$out/recipe.log" 2>&1
echo "recipe exit $? after $(( $(date +%s) - start )) s"; tail -45 "$out/recipe.log"
mkdir -p "$out/assets/demo"
cp clipcount/assets/demo/model.safetensors clipcount/assets/demo/config.json "$out/assets/demo/" 2>/dev/null
cp clipcount/assets/example.jpg "$out/assets/" 2>/dev/null
cp /tmp/recipe-full/report.json /tmp/recipe-full/recipe.json "$out/" 2>/dev/null
start=$(date +%s)
timeout 150 python3 benchmarks/speed.py --skip-cpu --out "$out/speed_gpu.json" > "$out/speed.log" 2>&1
echo "speed exit $? after $(( $(date +%s) - start )) s"; tail -30 "$out/speed.log"
