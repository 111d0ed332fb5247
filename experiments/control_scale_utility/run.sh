#!/usr/bin/env bash
# Does sampling at ControlNet scale 1.5 make the synthetic pairs useful beyond extra steps?
#
#   bash experiments/control_scale_utility/run.sh   # ~65 min on 2 cores, after the polyp
#                                                   # experiment (its 3000-step run, out/)
#
# The sampling sweep found scale 1.5 the one setting whose pairs lifted a U-Net (+5.1 mDice,
# mask-only arm), but against a real-only baseline trained fewer steps. The polyp experiment's
# 3000-step run then showed that extra steps alone explain scale 1's gain. Here both of its
# models sample the same 160 training masks x 2 at scale 1.5 (DDIM 50, guidance 9, eta 0) and
# are evaluated exactly as there: its yardstick segmenter and its utility protocol (U-Net,
# 96 px, 5 epochs, seeds 0-2) with the matched-steps real-only control. summarize.py compares
# them with that run's scale-1 evaluations and refuses sets or protocols that differ in anything
# but the scale. Stages skip what is done, so a rerun continues. Knobs: POLYP, WORK, DEVICE,
# CONTROL_SCALE.
set -euo pipefail
main() {  # one function, parsed whole before it runs: editing this file mid-run is safe
here=$(cd "$(dirname "$0")" && pwd)
polyp=${POLYP:-$here/../polyp_siamese_vs_maskonly/out}
work=${WORK:-$here/out}                  # git-ignored
device=${DEVICE:-cpu}
scale=${CONTROL_SCALE:-1.5}
arms=(mask-only siamese)
source "$here/../parallel.sh"   # one core per process
need_polyp "$polyp" "" data/manifest-v1.json segmenter/segmenter.json model-mask-only \
  model-siamese eval-mask-only/metrics.json eval-siamese/metrics.json
work_dir "$work"

arm() {  # arm NAME: sample (training masks, 8 test masks for the grid), evaluate; each once
  local name=$1 start
  local sampler=(--steps 50 --guidance 9 --control-scale "$scale" --device "$device")
  start=$(date +%s)
  siamdiff sample "$polyp/model-$name" --masks "$polyp/data:train" --out "$work/syn-$name" \
    --limit 160 --per-mask 2 "${sampler[@]}" >>"$work/sample-$name.log" 2>&1
  siamdiff sample "$polyp/model-$name" --masks "$polyp/data:test" --out "$work/grid-$name" \
    --limit 8 "${sampler[@]}" >>"$work/sample-$name.log" 2>&1
  [ -f "$work/eval-$name/metrics.json" ] || siamdiff evaluate "$polyp/data" "$work/syn-$name" \
    --out "$work/eval-$name/metrics.json" --segmenter "$polyp/segmenter" --utility \
    --utility-size 96 --utility-epochs 5 --utility-seeds 3 --utility-archs unet \
    --utility-matched-steps --device "$device" >"$work/evaluate-$name.log" 2>&1
  printf '{"arm": "%s", "seconds": %d}\n' "$name" "$(($(date +%s) - start))" >>"$work/stages.jsonl"
}

pids=()
for name in "${arms[@]}"; do
  arm "$name" &
  pids+=($!)
done
wait_all "${pids[@]}"

python3 "$here/summarize.py" --work "$work" --polyp "$polyp" --out "$here" --arms "${arms[@]}" \
  --control-scale "$scale" --device "$device" \
  --command "$(knobs POLYP WORK DEVICE CONTROL_SCALE)bash experiments/control_scale_utility/run.sh"
}
main "$@"
