#!/usr/bin/env bash
# The prepared GPU check: the CUDA tests and the GPU figures in one run, most important first, each step under its
# own time limit (`timeout -k 10`; LIMIT below). The limits add up to 410 s: one 10-minute device call holds the run.
#
#   OUT=device_out bash benchmarks/device_check.sh                   # every step, in this order
#   bash benchmarks/device_check.sh train_compile tests_compile      # only these (e.g. a rerun of what ran out of time)
#   bash benchmarks/device_check.sh --plan                           # the steps and their limits; runs nothing
#
#   machine          GPU, Python, torch, diffusers, a C compiler and Python.h (torch.compile's Triton needs them)
#   tests            tests/test_cuda.py but --compile: bf16 + channels_last vs fp32 on the CPU, fused attention, no
#                    host-device sync in a training step (bf16; fp16 + GradScaler), train.fit's syncs not growing with
#                    the steps, fp16 steps finite, train.py and generate.py end to end
#   train_bf16_cl    train_throughput.py: the default 64x64 UNet against diffusers' UNet2DModel, batch 256, bf16,
#                    channels_last: images/s, MFU, peak memory
#   train_bf16_nchw  the same, NCHW; the layout in which ours was faster is the one the train_ steps below use
#   train_fp16       batch 256, fp16 autocast + GradScaler
#   train_b32        batch 32 (train.py's default), bf16
#   run              a 64x64 toyfaces run of train.py, two steps per stage (sampling speed needs no quality)
#   sampling         benchmarks/sampling.py on it: DDPM-100 and DPM-Solver++(2M) 20 steps, guided and unguided,
#                    256 images in one batch
#   counterfactuals  evaluate.py counterfactuals on it, 256 test faces per direction at generate.EDIT_DEFAULTS
#   train_compile    batch 256, bf16, --compile (both networks compile first)
#   tests_compile    the end-to-end test with --compile
#   summary          every training figure in one table, and the hours of train.py's default diffusion stage (50
#                    epochs of CelebA's 50%: 81,385 images) at batch 32 and at the fastest batch-256 setting
#
# Output in ${OUT:-device_out}/: device_check.log (everything printed), tests.xml and tests_compile.xml (pytest's JUnit
# reports), train_<setting>_<layout>.json (train_throughput.py, written after its timing), run_log.jsonl, sampling.json,
# eval/counterfactuals.json and .md, summary.json. The exit status is 0 only if every step ended in time with
# status 0; $OUT/failed lists the others. pytest gets SIGINT at its limit, so it still writes its report.
# diffusers: where the machine lacks it, run `python benchmarks/stage_device_site.py` here first (same Python minor
# version as the machine) and carry ".device_site"; this script puts it on PYTHONPATH. Without it, the train_ steps
# time ours alone and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=(machine tests train_bf16_cl train_bf16_nchw train_fp16 train_b32 run sampling counterfactuals train_compile
       tests_compile summary)
declare -A LIMIT=([machine]=15 [tests]=50 [train_bf16_cl]=30 [train_bf16_nchw]=25 [train_fp16]=25 [train_b32]=20
                  [run]=25 [sampling]=25 [counterfactuals]=45 [train_compile]=95 [tests_compile]=50 [summary]=5)
if [ "${1:-}" = --plan ]; then
  total=0
  for s in "${STEPS[@]}"; do printf '%-16s %4d s\n' "$s" "${LIMIT[$s]}"; total=$((total + LIMIT[$s])); done
  printf '%-16s %4d s\n' total "$total"
  exit 0
fi
for s in "$@"; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "error: unknown step '$s'; pick from ${STEPS[*]} (none: all; --plan lists them)" >&2
                               exit 2; }
done
SELECTED=("$@")
[ ${#SELECTED[@]} -eq 0 ] && SELECTED=("${STEPS[@]}")
OUT=${OUT:-device_out}
mkdir -p "$OUT"
rm -f "$OUT/failed"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
[ -d .device_site ] && export PYTHONPATH="$PWD/.device_site${PYTHONPATH:+:$PYTHONPATH}"
RUN=${RUN_DIR:-/tmp/device_check_run}
BATCH=(--batch_size 256 --steps 5 --repeats 3 --warmup 2)          # the batch-256 throughput runs

# limit STEP CMD...: run CMD under STEP's time limit; a failure or a timeout is noted in $OUT/failed
limit() {
  local step=$1; shift
  local sig=TERM; [ "${2:-}" = -m ] && [ "${3:-}" = pytest ] && sig=INT
  timeout -s "$sig" -k 10 "${LIMIT[$step]}" "$@"; local rc=$?
  local why="exit $rc"; [ $rc -eq 124 ] && why="out of time (${LIMIT[$step]} s)"
  [ $rc -eq 0 ] || { echo "!!! $step: $why"; echo "$step: $why: $*" >> "$OUT/failed"; }
  return $rc
}
no_bars() { tr '\r' '\n' | grep --line-buffered -v 'it/s\]\|s/it\]'; }
# the layout in which ours trained faster at batch 256, bf16 (channels_last, as train.py, where not measured)
best_layout() {
  $PY - "$OUT" <<'EOF'
import json, os, sys
ips = {}
for layout in ("channels_last", "contiguous"):
    try:
        with open(os.path.join(sys.argv[1], f"train_bf16_{layout}.json")) as f:
            ips[layout] = json.load(f)["median_images_per_s"]["ours"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
print(max(ips, key=ips.get) if ips else "channels_last")
EOF
}
throughput() {       # throughput STEP NAME LAYOUT FLAGS...: train_throughput.py -> $OUT/train_<NAME>_<LAYOUT>.json
  local step=$1 name=$2 layout=$3; shift 3
  limit "$step" $PY benchmarks/train_throughput.py --memory_format "$layout" "$@" \
      --json "$OUT/train_${name}_$layout.json"
}

step_machine() {
  limit machine $PY - <<'EOF'
import os, shutil, subprocess, sys, sysconfig
import torch
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "-L"])
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
try:
    import diffusers
    print("diffusers", diffusers.__version__)
except ImportError as e:
    print(f"diffusers missing ({e}): the train_ steps time ours alone")
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("C compiler", shutil.which("cc") or shutil.which("gcc") or "MISSING", "| Python.h",
      "found" if os.path.isfile(header) else "MISSING", "(torch.compile's Triton launcher needs both)")
sys.exit(0 if torch.cuda.is_available() else "no CUDA device: the CUDA tests skip and the figures are the CPU's")
EOF
}
step_tests() {
  limit tests $PY -m pytest -q -p no:cacheprovider -k "not compile" --junitxml "$OUT/tests.xml" tests/test_cuda.py
}
step_train_bf16_cl() { throughput train_bf16_cl bf16 channels_last "${BATCH[@]}" --precision bf16; }
step_train_bf16_nchw() { throughput train_bf16_nchw bf16 contiguous "${BATCH[@]}" --precision bf16; }
step_train_fp16() { throughput train_fp16 fp16 "$(best_layout)" "${BATCH[@]}" --precision fp16; }
step_train_b32() {
  throughput train_b32 b32_bf16 "$(best_layout)" --batch_size 32 --steps 20 --repeats 3 --warmup 3 --precision bf16
}
step_run() {
  limit run $PY train.py --dataset toyfaces --subset_fraction 0.35 --classifier_epochs 1 --oracle_epochs 1 \
      --diffusion_epochs 1 --max_steps_per_epoch 2 --sample_every 0 --device cuda --overwrite --output_dir "$RUN" \
      2>&1 | no_bars
  cp "$RUN/train_log.jsonl" "$OUT/run_log.jsonl" 2>/dev/null
}
step_sampling() {
  limit sampling $PY benchmarks/sampling.py --run_dir "$RUN" --configs ddpm:100 dpmpp2m:20 --targets 1 \
      --num_samples 256 --batch_size 256 --device cuda --json "$OUT/sampling.json" 2>&1 | no_bars
}
step_counterfactuals() {
  limit counterfactuals $PY evaluate.py counterfactuals --run_dir "$RUN" --n 256 --batch_size 256 --device cuda \
      --out "$OUT/eval" 2>&1 | no_bars
}
step_train_compile() {
  throughput train_compile compile_bf16 "$(best_layout)" "${BATCH[@]}" --precision bf16 --compile
}
step_tests_compile() {
  limit tests_compile $PY -m pytest -q -p no:cacheprovider -k compile --junitxml "$OUT/tests_compile.xml" \
      tests/test_cuda.py
}
step_summary() {
  limit summary $PY - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
IMAGES, EPOCHS = 81_385, 50     # train.py's defaults: 50 diffusion epochs of CelebA's 162,770 training images x 0.5
rows, summary = [], {}
for path in sorted(glob.glob(os.path.join(out, "train_*.json"))):
    with open(path) as f:
        r = json.load(f)
    for model, ips in (r.get("median_images_per_s") or {}).items():
        rows.append({"file": os.path.basename(path), "batch": r["args"]["batch_size"], "precision": r["precision"],
                     "layout": r["memory_format"], "compile": r["args"]["compile"], "model": model, "images_per_s": ips,
                     "mfu": (r.get("mfu") or {}).get(model), "peak_gib": (r.get("peak_memory_gib") or {}).get(model),
                     "hours_50_epochs": EPOCHS * IMAGES / ips / 3600})
print("| batch | precision | layout | compile | model | images/s | MFU | peak GiB | h for 50 epochs |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    print(f"| {r['batch']} | {r['precision']} | {r['layout']} | {r['compile']} | {r['model']} | "
          f"{r['images_per_s']:.0f} | {mfu} | {peak} | {r['hours_50_epochs']:.2f} |")
ours = [r for r in rows if r["model"] == "ours"]
for batch in (32, 256):
    best = max((r for r in ours if r["batch"] == batch), key=lambda r: r["images_per_s"], default=None)
    if best:
        summary[f"batch_{batch}"] = best
        print(f"train.py's default diffusion stage ({EPOCHS} epochs x {IMAGES:,} images) at batch {batch}, ours, "
              f"{best['precision']}, {best['layout']}{', compiled' if best['compile'] else ''}: "
              f"{best['hours_50_epochs']:.2f} h (the training step alone: no EMA, data, evaluation or sample grids)")
try:
    with open(os.path.join(out, "eval", "counterfactuals.json")) as f:
        cf = json.load(f)
    n = cf["rows"]["pooled"]["n"]
    summary["counterfactuals_per_s"] = n / cf["seconds"]
    print(f"counterfactuals: {n} in {cf['seconds']:.1f} s, {n / cf['seconds']:.1f} per second (metrics included)")
except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
    print(f"counterfactuals: no figure ({type(e).__name__}: {e})")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"training": rows, **summary}, f, indent=2)
EOF
}

{
  for s in "${SELECTED[@]}"; do
    echo; echo "=== $s, limit ${LIMIT[$s]} s ($(date +%T))"
    "step_$s"
  done
  echo; echo "=== done ($(date +%T))"
  [ -s "$OUT/failed" ] && echo "failed or out of time:" && sed 's/^/  /' "$OUT/failed"
} 2>&1 | tee -a "$OUT/device_check.log"          # appended: a rerun of one step keeps the earlier record
[ ! -s "$OUT/failed" ]
