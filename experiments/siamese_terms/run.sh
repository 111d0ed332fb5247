#!/usr/bin/env bash
# Which Siamese term costs mask fidelity? The Siamese arm retrained without one term at a time.
#
#   bash experiments/siamese_terms/run.sh     # ~40 min on 2 cores, after the polyp experiment's
#                                             # 1200-step run (its steps-1200/ line)
#
# In every CPU run of ../polyp_siamese_vs_maskonly the mask-only arm's samples matched their
# masks better than the Siamese arm's. Each variant here trains from that experiment's Siamese
# run config (its resolved config.yaml: same data, seed, model, budget) with one setting changed,
# then samples and evaluates exactly as there (160 training masks x 2, DDIM 50, guidance 9, its
# yardstick segmenter, no utility stage). summarize.py compares them with that experiment's two
# arms and probes how much each denoiser uses its mask; it refuses variants whose configs differ
# from the Siamese arm's in anything but their own settings. Stages skip what is done, so a rerun
# continues. Environment knobs: POLYP (that experiment's work folder), WORK, DEVICE, VARIANTS
# ("NAME=KEY=VALUE[;KEY=VALUE...] ...": other variants), RESULTS (where results.* go; its
# notes.md is appended). The capacity test in wide/ (both arms 1.5x wider, ~50 min):
#
#   w='backbone.unet.block_out_channels=[96,96,192]' d=experiments/siamese_terms
#   VARIANTS="wide-mask-only=model.mode=mask-only;$w wide-siamese=$w" RESULTS=$d/wide bash $d/run.sh
#
# and at 3000 steps in wide-3000/ (~95 min), against the polyp experiment's 3000-step run:
#
#   POLYP=experiments/polyp_siamese_vs_maskonly/out WORK=$d/out-3000 \
#   VARIANTS="wide-mask-only=model.mode=mask-only;$w wide-siamese=$w" RESULTS=$d/wide-3000 bash $d/run.sh
set -euo pipefail
main() {  # one function, parsed whole before it runs: editing this file mid-run is safe
here=$(cd "$(dirname "$0")" && pwd)
polyp=${POLYP:-$here/../polyp_siamese_vs_maskonly/out-1200}
work=${WORK:-$here/out}                  # git-ignored
device=${DEVICE:-cpu}
# name=settings: what each variant changes in the Siamese arm's config (here: the loss term
# it leaves out); settings are separated by ';'
read -r -a variants <<<"${VARIANTS:-no-consistency=model.consistency_weight=0 no-augmentation=model.aug_start=1}"
results=${RESULTS:-$here}
source "$here/../parallel.sh"   # one core per process
need_polyp "$polyp" " (its steps-1200 line)" data/manifest-v1.json segmenter/segmenter.json \
  run-siamese/config.yaml eval-mask-only/metrics.json eval-siamese/metrics.json
work_dir "$work"

variant() {  # variant NAME SETTINGS: train -> export -> sample -> evaluate, each once
  # data.root: the polyp experiment's data where it is now (its folder may have been renamed
  # since it trained, and its config records the old path)
  local name=$1 settings run=$work/run-$1 resume=() start
  IFS=';' read -r -a settings <<<"$2"
  [ -d "$run/checkpoints" ] && resume=(--resume)
  start=$(date +%s)
  siamdiff train "$polyp/run-siamese/config.yaml" run_dir="$run" "${settings[@]}" \
    data.root="$polyp/data" data.latent_cache="$work/latents-$name.lmdb" \
    ${resume[@]+"${resume[@]}"} \
    >>"$work/train-$name.log" 2>&1
  [ -d "$work/model-$name" ] || siamdiff export "$run" "$work/model-$name"
  local sampler=(--steps 50 --device "$device")
  siamdiff sample "$work/model-$name" --masks "$polyp/data:train" --out "$work/syn-$name" \
    --limit 160 --per-mask 2 "${sampler[@]}" >>"$work/sample-$name.log" 2>&1
  siamdiff sample "$work/model-$name" --masks "$polyp/data:test" --out "$work/grid-$name" \
    --limit 8 "${sampler[@]}" >>"$work/sample-$name.log" 2>&1
  [ -f "$work/eval-$name/metrics.json" ] || siamdiff evaluate "$polyp/data" "$work/syn-$name" \
    --out "$work/eval-$name/metrics.json" --segmenter "$polyp/segmenter" --run "$run" \
    --device "$device" >"$work/evaluate-$name.log" 2>&1
  printf '{"variant": "%s", "seconds": %d}\n' "$name" "$(($(date +%s) - start))" \
    >>"$work/stages.jsonl"
}

pids=()
for spec in "${variants[@]}"; do
  variant "${spec%%=*}" "${spec#*=}" &
  pids+=($!)
done
wait_all "${pids[@]}"

mkdir -p "$results"
command="$(knobs WORK POLYP VARIANTS RESULTS DEVICE)bash experiments/siamese_terms/run.sh"
python3 "$here/summarize.py" --work "$work" --polyp "$polyp" --out "$results" \
  --variants "${variants[@]}" --command "$command" --device "$device"
}
main "$@"
