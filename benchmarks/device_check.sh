#!/usr/bin/env bash
# The one prepared GPU check, for a lent GPU machine (aim: under 9 minutes on an H200, so a rerun fits in a
# 15-minute lease). In order: the CUDA tests (tests/test_cuda.py, plus the CPU maths tests on that machine),
# the training-throughput benchmark at the default 64x64 model against diffusers (eager, then --compile),
# the data path on the GPU, and a short 64x64 toyfaces run with the sampling benchmark on it (seconds per
# image, oracle rates, guided/unguided step cost). Everything goes to ${OUT:-device_out}/: check.log holds
# all output; train.json, train_compile.json, data.json and sampling.json the figures (6 files at most).
#
#   bash benchmarks/device_check.sh
#
# diffusers is pure Python. Where the machine lacks it, copy it (and any module it misses there) into
# .device_site/ here, which git ignores, and carry that folder: the script puts it on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
LOG="$OUT/check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
[ -d .device_site ] && export PYTHONPATH="$PWD/.device_site${PYTHONPATH:+:$PYTHONPATH}"
RUN=${RUN_DIR:-/tmp/device_check_run}

step() { echo; echo "=== $1 ($(date +%T))"; }
{
  step "machine"
  nvidia-smi -L
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing: the training comparison will say so"

  step "CUDA tests, then the maths tests on this machine"
  timeout 360 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_diffusion.py

  step "training throughput, default 64x64 UNet, batch 32, bf16 (eager)"
  timeout 150 $PY benchmarks/train_throughput.py --steps 20 --repeats 5 --json "$OUT/train.json"

  step "training throughput, --compile"
  timeout 300 $PY benchmarks/train_throughput.py --compile --steps 20 --repeats 5 --warmup 10 --json "$OUT/train_compile.json"

  step "data path: uint8 cache vs JPEG decoding, training step on the GPU"
  timeout 150 $PY benchmarks/data_path.py --device cuda --num_workers 8 --json "$OUT/data.json"

  step "short 64x64 toyfaces run (default UNet), then the sampling benchmark on it"
  timeout 420 $PY train.py --dataset toyfaces --image_size 64 --classifier_epochs 3 --oracle_epochs 3 \
      --diffusion_epochs 6 --batch_size 128 --lr 2e-4 --num_workers 8 --sample_every 0 --overwrite \
      --output_dir "$RUN" 2>&1 | grep -v "it/s\]" | tail -n 40
  timeout 300 $PY benchmarks/sampling.py --run_dir "$RUN" --device cuda --configs ddpm:1000 ddpm:100 ddim:100 ddim:50 ddim:50:1 \
      --num_samples 256 --batch_size 256 --guidance_scale 10 --step_repeats 30 --json "$OUT/sampling.json"
  step "done"
} 2>&1 | tee "$LOG"
