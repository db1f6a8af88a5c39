#!/usr/bin/env bash
# The prepared GPU check, in two parts that each fit one 10-minute device call (about 11 minutes in all on an
# H200, inside a 15-minute lease):
#
#   bash benchmarks/device_check.sh tests   # CUDA tests (tests/test_cuda.py) and the maths tests, ~5 min
#   bash benchmarks/device_check.sh bench   # benchmarks at the default 64x64 model, ~6 min
#   bash benchmarks/device_check.sh         # both, one after the other (on your own GPU machine)
#
# bench: training images/s and MFU against diffusers (eager, then --compile), the two paths of each
# dual-path layer (benchmarks/layer_paths.py), the data path with the training
# step on the GPU, and a short 64x64 toyfaces run with the sampling benchmark on it (seconds per image, oracle
# rates, the guided/unguided cost of one step). Output goes to ${OUT:-device_out}/: tests.log or bench.log
# with everything printed, and train.json, train_compile.json, data.json, sampling.json, train_log.jsonl.
# Each step has its own time limit and writes its JSON file when it ends (sampling.json after every row),
# so a step that runs out of time costs only its own figures.
#
# diffusers is pure Python. Where the machine lacks it, copy it (and any module it misses there) into
# .device_site/ here, which git ignores, and carry that folder: the script puts it on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
case "$PART" in tests|bench|all) ;; *) echo "error: unknown part '$PART'; use tests, bench or nothing for both" >&2; exit 2;; esac
OUT=${OUT:-device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
[ -d .device_site ] && export PYTHONPATH="$PWD/.device_site${PYTHONPATH:+:$PYTHONPATH}"
RUN=${RUN_DIR:-/tmp/device_check_run}

step() { echo; echo "=== $1 ($(date +%T))"; }
machine() {
  step "machine"
  nvidia-smi -L
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing: the training comparison will say so"
}
no_bars() { tr '\r' '\n' | grep --line-buffered -v 'it/s\]\|img/s\]\|s/it\]'; }

tests() {
  machine
  step "CUDA tests, then the maths tests on this machine"
  timeout 480 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_diffusion.py
}

bench() {
  machine
  step "training throughput, default 64x64 UNet, batch 32, bf16 (eager), and where a step's GPU time goes"
  timeout 90 $PY benchmarks/train_throughput.py --steps 20 --repeats 5 --breakdown --json "$OUT/train.json"
  step "the two paths of each dual-path layer on the GPU (does the transposed-conv upsampling pay there too?)"
  timeout 45 $PY benchmarks/layer_paths.py --device cuda --batch_size 32 --iters 20
  step "training throughput, --compile"
  timeout 150 $PY benchmarks/train_throughput.py --compile --steps 20 --repeats 5 --warmup 10 --json "$OUT/train_compile.json"
  step "data path: uint8 cache vs JPEG decoding, training step on the GPU"
  timeout 60 $PY benchmarks/data_path.py --device cuda --num_workers 8 --json "$OUT/data.json"
  step "short 64x64 toyfaces run (default UNet), then the sampling benchmark on it"
  timeout 150 $PY train.py --dataset toyfaces --image_size 64 --subset_fraction 0.25 --classifier_epochs 3 \
      --oracle_epochs 3 --diffusion_epochs 6 --batch_size 128 --lr 2e-4 --num_workers 8 --sample_every 0 \
      --overwrite --output_dir "$RUN" 2>&1 | no_bars
  cp "$RUN/train_log.jsonl" "$OUT/" 2>/dev/null
  timeout 100 $PY benchmarks/sampling.py --run_dir "$RUN" --device cuda --configs ddpm:1000 ddpm:100 ddim:100 ddim:50 ddim:50:1 \
      --num_samples 64 --batch_size 64 --guidance_scale 10 --step_repeats 30 --json "$OUT/sampling.json" 2>&1 | no_bars
}

if [ "$PART" != bench ]; then tests 2>&1 | tee "$OUT/tests.log"; fi
if [ "$PART" != tests ]; then bench 2>&1 | tee "$OUT/bench.log"; fi
step "done"
