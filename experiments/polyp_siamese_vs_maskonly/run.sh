#!/usr/bin/env bash
# Siamese-Diffusion vs mask-only ControlNet+DHI on Kvasir-SEG + CVC-ClinicDB, same budget.
#
#   bash experiments/polyp_siamese_vs_maskonly/run.sh          # CPU scale (cpu.yaml), ~2 h on 2 cores
#
# prepare -> train both arms -> export -> sample (training masks, and 8 test masks for the grid)
# -> segmenter on the real training split (the yardstick) -> evaluate both arms (and the Siamese
# arm sampled with DPM-Solver++ in 20 steps, the faster solver's cost) -> results.json,
# results.md, samples.png beside this script. Every stage skips or resumes what is already done
# in $WORK, so rerunning after an interruption continues. The two arms run side by side, one
# core each. Environment knobs (defaults = the committed CPU run): CONFIG, SIZE, SAMPLE_MASKS,
# PER_MASK, STEPS, SEG_SIZE, SEG_EPOCHS, UTIL_SIZE, UTIL_EPOCHS, UTIL_SEEDS, UTIL_ARCHS, DEVICE;
# TRAIN_OVERRIDES (key=value settings added to both arms' training, e.g. a longer budget),
# UTILITY=0 (no segmentation utility: the hour per arm it takes on 2 cores), UTIL_MATCHED_STEPS=0
# (no real-only control at real + synthetic's step count: a third of that hour), RESULTS (the
# folder results.json, results.md and samples.png go to; its notes.md is appended).
#
#   d=experiments/polyp_siamese_vs_maskonly    # the same at runs 1-3's 1200 steps (steps-1200/):
#   WORK=$d/out-1200 RESULTS=$d/steps-1200 UTILITY=0 TRAIN_OVERRIDES="train.max_steps=1200 \
#     optim.warmup_steps=100 model.consistency_warmup_steps=300" bash $d/run.sh
set -euo pipefail
main() {  # one function, parsed whole before it runs: editing this file mid-run is safe
here=$(cd "$(dirname "$0")" && pwd)
shared=${SHARED:-${SIAMDIFF_SHARED:-$(cd "$here/../../.." && pwd)/shared}}
work=${WORK:-$here/out}                  # git-ignored
config=${CONFIG:-$here/cpu.yaml}
size=${SIZE:-128}
sample_masks=${SAMPLE_MASKS:-160}        # training masks sampled per arm ...
per_mask=${PER_MASK:-2}                  # ... this many times each (2+: MS-SSIM diversity)
steps=${STEPS:-50}                       # DDIM steps (eta 0, guidance 9)
seg_size=${SEG_SIZE:-128}
seg_epochs=${SEG_EPOCHS:-6}
util_size=${UTIL_SIZE:-96}
util_epochs=${UTIL_EPOCHS:-5}
util_seeds=${UTIL_SEEDS:-3}
util_archs=${UTIL_ARCHS:-unet}
device=${DEVICE:-cpu}
read -r -a train_overrides <<<"${TRAIN_OVERRIDES:-}"
utility=${UTILITY:-1}
util_matched_steps=${UTIL_MATCHED_STEPS:-1}
results=${RESULTS:-$here}
arms=(mask-only siamese)
source "$here/../parallel.sh"   # one core per process
work_dir "$work"
data=$work/data
stages=$work/stages.jsonl                # wall time per stage, for results.json

stage() {  # stage NAME COMMAND...: run it, append {"stage", "seconds"} to $stages
  local name=$1 start
  shift
  start=$(date +%s)
  echo "== $name"
  "$@"
  printf '{"stage": "%s", "seconds": %d}\n' "$name" "$(($(date +%s) - start))" >>"$stages"
}

# timed_unless DONE NAME COMMAND...: stage, but untimed once DONE exists (the rerun of a
# finished stage only checks its settings: no work of that stage)
timed_unless() {
  local done=$1
  shift
  if [ -e "$done" ]; then shift; "$@"; else stage "$@"; fi
}

if [ ! -f "$data/manifest-v1.json" ]; then
  stage prepare siamdiff prepare --source kvasir-seg="$shared/data/Kvasir-SEG" \
    --source cvc-clinicdb="$shared/data/CVC-ClinicDB" --out "$data" --size "$size"
fi

arm_pipeline() {  # train -> export -> sample, for one arm
  local arm=$1 run=$work/run-$1 resume=()
  [ -d "$run/checkpoints" ] && resume=(--resume)
  stage "train $arm" siamdiff train "$config" run_dir="$run" model.mode="$arm" \
    data.root="$data" data.latent_cache="$work/latents-$arm.lmdb" \
    autoencoder.path="$shared/weights/taef2" ${train_overrides[@]+"${train_overrides[@]}"} \
    ${resume[@]+"${resume[@]}"} >>"$work/train-$arm.log" 2>&1
  [ -d "$work/model-$arm" ] || siamdiff export "$run" "$work/model-$arm"
  timed_unless "$work/syn-$arm/manifest-v1.json" "sample $arm" siamdiff sample \
    "$work/model-$arm" --masks "$data:train" \
    --out "$work/syn-$arm" --limit "$sample_masks" --per-mask "$per_mask" --steps "$steps" \
    --device "$device" >>"$work/sample-$arm.log" 2>&1
  siamdiff sample "$work/model-$arm" --masks "$data:test" --out "$work/grid-$arm" --limit 8 \
    --steps "$steps" --device "$device" >>"$work/sample-$arm.log" 2>&1
}

yardstick() {  # the evaluation's segmenter: real training split only, fixed seed
  [ -f "$work/segmenter/segmenter.json" ] && return 0
  stage "train-segmenter" siamdiff train-segmenter "$data" --out "$work/segmenter" \
    --size "$seg_size" --epochs "$seg_epochs" --batch-size 16 --seed 0 --device "$device" \
    --overwrite >"$work/segmenter.log" 2>&1
}

solver_study() {  # the faster solver's cost: DPM-Solver++ 20 steps vs DDIM 50, Siamese arm
  local arm=siamese name=siamese-dpm20
  timed_unless "$work/syn-$name/manifest-v1.json" "sample $name" siamdiff sample \
    "$work/model-$arm" --masks "$data:train" \
    --out "$work/syn-$name" --limit "$sample_masks" --per-mask "$per_mask" --steps 20 \
    --scheduler dpmsolver++ --device "$device" >>"$work/sample-$name.log" 2>&1
  [ -f "$work/eval-$name/metrics.json" ] && return 0
  stage "evaluate $name" siamdiff evaluate "$data" "$work/syn-$name" \
    --out "$work/eval-$name/metrics.json" --segmenter "$work/segmenter" --device "$device" \
    >"$work/evaluate-$name.log" 2>&1
}

wait_for() {  # wait_for PATH: until the other pipeline has written it (3 hours at most)
  local tries
  for tries in $(seq 540); do
    [ -e "$1" ] && return 0
    sleep 20
  done
  echo "$1 never came: the other pipeline failed (see its log)" >&2
  return 1
}

evaluate_arm() {
  local arm=$1 utility_args=()
  [ -f "$work/eval-$arm/metrics.json" ] && return 0
  [ "$utility" = 1 ] && utility_args=(--utility --utility-size "$util_size"
    --utility-epochs "$util_epochs" --utility-seeds "$util_seeds" --utility-archs "$util_archs")
  [ "$utility" = 1 ] && [ "$util_matched_steps" = 1 ] && utility_args+=(--utility-matched-steps)
  stage "evaluate $arm" siamdiff evaluate "$data" "$work/syn-$arm" \
    --out "$work/eval-$arm/metrics.json" --segmenter "$work/segmenter" --run "$work/run-$arm" \
    ${utility_args[@]+"${utility_args[@]}"} --device "$device" >"$work/evaluate-$arm.log" 2>&1
}

# Arm 1 trains faster (no image branch), so its core also trains the yardstick segmenter and
# runs the solver study once the Siamese model is exported.
(arm_pipeline mask-only; yardstick; evaluate_arm mask-only; wait_for "$work/model-siamese"
  solver_study) &
first=$!
(arm_pipeline siamese; wait_for "$work/segmenter/segmenter.json"; evaluate_arm siamese) &
second=$!
wait_all "$first" "$second"

given=$(knobs CONFIG SIZE SAMPLE_MASKS PER_MASK STEPS SEG_SIZE SEG_EPOCHS UTIL_SIZE UTIL_EPOCHS \
  UTIL_SEEDS UTIL_ARCHS DEVICE TRAIN_OVERRIDES UTILITY UTIL_MATCHED_STEPS RESULTS WORK)
mkdir -p "$results"
python3 "$here/summarize.py" --work "$work" --out "$results" --arms "${arms[@]}" \
  --device "$device" --solver-study siamese-dpm20 --command "${given}bash $0"
}
main "$@"
