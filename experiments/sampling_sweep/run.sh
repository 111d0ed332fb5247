#!/usr/bin/env bash
# Guidance and ControlNet scale for Mask-Diffusion sampling: mask fidelity, FD-seg, diversity.
#
#   bash experiments/sampling_sweep/run.sh      # ~2 h on 2 cores, after ../polyp_siamese_vs_maskonly
#
# Samples both arms of the polyp experiment (its prepared data, exported models and yardstick
# segmenter, from $POLYP) at each guidance:control_scale setting: the same 160 training masks x 2
# seeds as that experiment (DDIM 50, eta 0), plus 8 test masks for the grid; evaluates each set
# without the utility stage; summarize.py writes results.json, results.md, sweep.png and
# grid-<arm>.png beside this script. Finished settings are skipped, so a rerun continues.
# Settings in UTILITY_SETTINGS also get the polyp experiment's segmentation utility protocol
# (U-Net, 96 px, 5 epochs, seeds 0-2; ~45 min each); MORE_SEEDS=3 adds seeds 3-5 (~45 min),
# pooled with 0-2 (off by default: the committed results hold seeds 0-2). Environment knobs:
# POLYP, WORK, SETTINGS ("guidance:control_scale ..."), UTILITY_SETTINGS, MORE_SEEDS, DEVICE.
set -euo pipefail
main() {
here=$(cd "$(dirname "$0")" && pwd)
polyp=${POLYP:-$here/../polyp_siamese_vs_maskonly/out}
work=${WORK:-$here/out}                  # git-ignored
settings=${SETTINGS:-1:1 3:1 5:1 9:1 13:1 9:0.5 9:1.5 9:2}
utility_settings=${UTILITY_SETTINGS:-9:1.5}
more_seeds=${MORE_SEEDS:-0}              # utility seeds beyond 0-2, for UTILITY_SETTINGS only
device=${DEVICE:-cpu}
arms=(mask-only siamese)
source "$here/../parallel.sh"   # one core per process
need_polyp "$polyp" "" data/manifest-v1.json segmenter/segmenter.json model-mask-only \
  model-siamese eval-mask-only/metrics.json eval-siamese/metrics.json
work_dir "$work"

setting() {  # setting ARM GUIDANCE CONTROL_SCALE: sample, grid, evaluate (each once)
  local arm=$1 guidance=$2 scale=$3 dir start
  dir=$work/$arm-g$guidance-c$scale
  mkdir -p "$dir"
  local sampler=(--steps 50 --guidance "$guidance" --control-scale "$scale" --device "$device")
  if [ ! -f "$dir/syn/manifest-v1.json" ]; then
    start=$(date +%s)
    siamdiff sample "$polyp/model-$arm" --masks "$polyp/data:train" --out "$dir/syn" \
      --limit 160 --per-mask 2 "${sampler[@]}" >"$dir/sample.log" 2>&1
    printf '{"stage": "sample %s g%s c%s", "seconds": %d}\n' "$arm" "$guidance" "$scale" \
      "$(($(date +%s) - start))" >>"$work/stages.jsonl"
  fi
  [ -f "$dir/grid/manifest-v1.json" ] || siamdiff sample "$polyp/model-$arm" \
    --masks "$polyp/data:test" --out "$dir/grid" --limit 8 "${sampler[@]}" >>"$dir/sample.log" 2>&1
  [ -f "$dir/eval/metrics.json" ] || siamdiff evaluate "$polyp/data" "$dir/syn" \
    --out "$dir/eval/metrics.json" --segmenter "$polyp/segmenter" --device "$device" \
    >"$dir/evaluate.log" 2>&1
}

utility() {  # utility ARM GUIDANCE CONTROL_SCALE: after setting, the utility protocol
  local dir=$work/$1-g$2-c$3
  local protocol=(--segmenter "$polyp/segmenter" --utility --utility-size 96 --utility-epochs 5
    --utility-archs unet --device "$device")
  [ -f "$dir/eval-utility/metrics.json" ] || siamdiff evaluate "$polyp/data" "$dir/syn" \
    --out "$dir/eval-utility/metrics.json" "${protocol[@]}" --utility-seeds 3 \
    >"$dir/evaluate-utility.log" 2>&1
  # Seeds 3.. on top of the polyp experiment's 0-2 (a 3-seed spread left the gain uncertain).
  [ "$more_seeds" -eq 0 ] || [ -f "$dir/eval-utility-more/metrics.json" ] || siamdiff evaluate \
    "$polyp/data" "$dir/syn" --out "$dir/eval-utility-more/metrics.json" "${protocol[@]}" \
    --utility-first-seed 3 --utility-seeds "$more_seeds" >"$dir/evaluate-utility-more.log" 2>&1
}

pids=()
for arm in "${arms[@]}"; do
  (for pair in $settings; do setting "$arm" "${pair%%:*}" "${pair##*:}"; done
    for pair in $utility_settings; do utility "$arm" "${pair%%:*}" "${pair##*:}"; done) &
  pids+=($!)
done
wait_all "${pids[@]}"

# shellcheck disable=SC2086  # the settings are words on purpose
python3 "$here/summarize.py" --work "$work" --polyp "$polyp" --out "$here" --arms "${arms[@]}" \
  --settings $settings --utility-settings $utility_settings --device "$device"
}
main "$@"
