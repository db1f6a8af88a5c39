#!/usr/bin/env bash
# The prepared GPU check, in parts; each part's steps have their own time limits, and the parts are sized so
# that "tests train" and then "sample compile" each fit one 10-minute device call (the most wanted first:
# --compile is an option, so it goes last):
#
#   bash benchmarks/device_check.sh tests train      # CUDA tests; training images/s and MFU vs diffusers, eager
#   bash benchmarks/device_check.sh sample compile   # data path; sampling at 64x64; everything with --compile
#   bash benchmarks/device_check.sh                  # every part, one after the other (on your own GPU machine)
#
#   tests    tests/test_cuda.py but --compile (bf16 vs fp32, SDPA kernels, a training step under CUDA's sync
#            debug mode, train.fit's syncs, train.py and generate.py end to end on the GPU)   limit 200 s
#   train    train_throughput.py at the default 64x64 model, batch 32, eager, channels_last (as train.py) with
#            --breakdown, then contiguous (on CUDA GroupNorm returns NCHW, so channels_last costs a copy per
#            norm: which layout wins is measured here); layer_paths.py on CUDA                195 s
#   sample   data_path.py with the training step on the GPU; a short 64x64 toyfaces run, then sampling.py on
#            it (seconds per image, oracle rates, guided/unguided cost of a step)             255 s
#   compile  the end-to-end test with --compile; train_throughput.py --compile               330 s
#
# The limits are caps, not measurements: "tests train" adds up to 395 s, "sample compile" to 585 s.
# The exit status is 0 only if every step ended in time with status 0 ($OUT/failed lists the others).
# Output goes to ${OUT:-device_out}/: <parts joined by _>.log with everything printed, tests.xml and
# tests_compile.xml (pytest's JUnit reports), train.json, train_contiguous.json, train_compile.json, data.json,
# sampling.json and train_log.jsonl. Each step writes its
# JSON as it goes (train_throughput after the timing and after --breakdown, sampling after every row), so a
# step that runs out of time costs only its own figures. Every limit is `timeout -k 10`: train.py finishes its
# step and saves on SIGTERM, so a plain timeout could overrun.
#
# diffusers: where the machine lacks it, run `python benchmarks/stage_device_site.py` here first (same Python
# minor version as the machine) and carry ".device_site"; this script puts it on PYTHONPATH. Without it,
# train_throughput times ours alone and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests train sample compile)
for part in "${PARTS[@]}"; do
  case "$part" in tests|train|compile|sample) ;;
    *) echo "error: unknown part '$part'; use any of tests, train, sample, compile (none: all four)" >&2; exit 2;;
  esac
done
OUT=${OUT:-device_out}
mkdir -p "$OUT"
rm -f "$OUT/failed"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
[ -d .device_site ] && export PYTHONPATH="$PWD/.device_site${PYTHONPATH:+:$PYTHONPATH}"
RUN=${RUN_DIR:-/tmp/device_check_run}
# every step runs under its time limit; a step that fails or runs out of time is noted, and the script's exit
# status says whether any did (pytest gets SIGINT, on which it still writes its report)
limit() {
  local sig=TERM; [ "$2" = -m ] && [ "$3" = pytest ] && sig=INT
  timeout -s "$sig" -k 10 "$@"; local rc=$?
  local why="exit $rc"; [ $rc -eq 124 ] && why="out of time"
  [ $rc -eq 0 ] || { echo "!!! $why: ${*:2}"; echo "$why: ${*:2}" >> "$OUT/failed"; }
  return $rc
}

step() { echo; echo "=== $1 ($(date +%T))"; }
machine() {
  step "machine"
  nvidia-smi -L
  $PY - <<'EOF'
import importlib.util, sys, sysconfig, os, shutil
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
try:
    import diffusers
    print("diffusers", diffusers.__version__)
except ImportError as e:
    print("diffusers missing (" + str(e) + "): train_throughput times ours alone")
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("C compiler", shutil.which("cc") or shutil.which("gcc") or "MISSING", "| Python.h",
      "found" if os.path.isfile(header) else "MISSING", "(torch.compile's Triton launcher needs both)")
EOF
}
no_bars() { tr '\r' '\n' | grep --line-buffered -v 'it/s\]\|img/s\]\|s/it\]'; }

tests() {
  step "CUDA tests (but --compile, which the compile part runs)"
  limit 200 $PY -m pytest -q -p no:cacheprovider -k "not compile" --junitxml "$OUT/tests.xml" tests/test_cuda.py
}

train() {
  step "training throughput, default 64x64 UNet, batch 32, bf16, eager, channels_last; where a step's GPU time goes"
  limit 90 $PY benchmarks/train_throughput.py --steps 20 --repeats 5 --breakdown --json "$OUT/train.json"
  step "the same, contiguous (NCHW) layout"
  limit 60 $PY benchmarks/train_throughput.py --steps 20 --repeats 5 --memory_format contiguous \
      --json "$OUT/train_contiguous.json"
  step "the two paths of each dual-path layer on the GPU (does the transposed-conv upsampling pay there too?)"
  limit 45 $PY benchmarks/layer_paths.py --device cuda --batch_size 32 --iters 20
}

compile() {
  step "train.py and generate.py end to end with --compile"
  limit 160 $PY -m pytest -q -p no:cacheprovider -k compile --junitxml "$OUT/tests_compile.xml" tests/test_cuda.py
  step "training throughput, --compile"
  limit 170 $PY benchmarks/train_throughput.py --compile --steps 20 --repeats 5 --warmup 10 \
      --json "$OUT/train_compile.json"
}

sample() {
  step "data path: uint8 cache vs JPEG decoding, training step on the GPU"
  limit 45 $PY benchmarks/data_path.py --device cuda --num_workers 8 --json "$OUT/data.json"
  step "short 64x64 toyfaces run (default UNet), then the sampling benchmark on it"
  limit 120 $PY train.py --dataset toyfaces --image_size 64 --subset_fraction 0.25 --classifier_epochs 3 \
      --oracle_epochs 3 --diffusion_epochs 6 --batch_size 128 --lr 2e-4 --num_workers 8 --sample_every 0 \
      --overwrite --output_dir "$RUN" 2>&1 | no_bars
  cp "$RUN/train_log.jsonl" "$OUT/" 2>/dev/null
  limit 90 $PY benchmarks/sampling.py --run_dir "$RUN" --device cuda --configs ddpm:1000 ddpm:100 ddim:100 ddim:50 \
      ddim:50:1 --num_samples 64 --batch_size 64 --guidance_scale 10 --step_repeats 30 --json "$OUT/sampling.json" \
      2>&1 | no_bars
}

LOG="$OUT/$(IFS=_; echo "${PARTS[*]}").log"
{
  machine
  for part in "${PARTS[@]}"; do "$part"; done
  step "done"
  [ -s "$OUT/failed" ] && echo "failed or out of time:" && sed 's/^/  /' "$OUT/failed"
} 2>&1 | tee "$LOG"
[ ! -s "$OUT/failed" ]