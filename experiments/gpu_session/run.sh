#!/usr/bin/env bash
# One device call on a lent H100/H200 for what CI cannot do, sized for the 15 minutes of device
# time a task gets (machine start included): about 9.5 minutes, every stage time-boxed, results
# copied to $OUT as each stage ends, so a stage that fails or runs out of time costs only itself.
#
#   bash experiments/gpu_session/prepare_carry.sh      # here first: .carry/ (data, TAEF2, wheels)
#   device run: command "bash experiments/gpu_session/run.sh", carry [".carry"], timeout_s 590
#   DRY_RUN=1 bash experiments/gpu_session/run.sh      # the same stages on this CPU, tiny sizes
#
# Stages: bench (issue 6: SD1.5-size training step and DDIM sampling against the naive
# reference, then each speed lever) -> prepare the real data at 256 px -> train the
# from-scratch backbone on it (issue 3: gpu.yaml, Siamese, stopped cleanly by SIGINT at its
# time box) -> export -> sample training masks in bf16 (issue 4) -> yardstick segmenter ->
# evaluate -> DeepSpeed ZeRO-2 check (issue 3: train, checkpoint, resume, export) -> train-vae
# (issue 3: a short run under bf16). Each stage's seconds and
# exit status go to stages.jsonl. $OUT gets session.log, bench.json, bench.md, loss_curve.png,
# train_samples.png, samples.png, metrics.json and details.tar.gz (logs, losses, configs,
# report). Knobs (environment): DEADLINE_S, BENCH_S, TRAIN_S, TRAIN_STEPS, SAMPLE_MASKS,
# SEG_EPOCHS, and the DRY_RUN sizes below (STRETCH: the DRY_RUN time boxes x4).
set -uo pipefail
main() {
repo=$(cd "$(dirname "$0")/../.." && pwd)
carry=${CARRY:-$repo/.carry}
out=${OUT:-/tmp/gpu-session-out}
work=${WORK:-/tmp/gpu-session}
started=$(date +%s)
if [ "${DRY_RUN:-0}" = 1 ]; then
  device=cpu bench_args=(--preset tiny --no-meta --speed channels_last,compile)
  config=$repo/experiments/polyp_siamese_vs_maskonly/cpu.yaml
  size=64 train_steps=${TRAIN_STEPS:-10} sample_masks=${SAMPLE_MASKS:-8} seg_epochs=1 workers=0
  deadline=${DEADLINE_S:-3600} batch=8 vae_steps=4 vae_size=64
  stretch=${STRETCH:-4}  # every stage's time box x4: 2 CPU cores are no GPU machine
else
  # Every lever measured, one added per variant (compile after the others: its compile time
  # is the longest, and the bench rewrites its JSON after each variant), the memory lever,
  # gradient checkpointing (issue 6: batch 8 under 40 GB), just before compile. The meta-device FLOP count
  # needs no GPU and is in the committed CPU results.
  device=cuda bench_args=(--preset sd15 --train-batches 8 16 --sample-batches 32 --no-meta
    --speed channels_last,bf16_frozen,compile --gradient-checkpointing)
  config=$repo/experiments/polyp_siamese_vs_maskonly/gpu.yaml
  size=256 train_steps=${TRAIN_STEPS:-3000} sample_masks=${SAMPLE_MASKS:-300}
  seg_epochs=${SEG_EPOCHS:-6} workers=8 deadline=${DEADLINE_S:-570} batch=32 vae_steps=1000 vae_size=128
  stretch=1
fi
rm -rf "$work"
mkdir -p "$work/logs" "$out"
log=$out/session.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo/src${PYTHONPATH:+:$PYTHONPATH}

say() { echo "[$(($(date +%s) - started)) s] $*" | tee -a "$log"; }

stage() {  # stage NAME SECONDS COMMAND...: run it time-boxed (SIGINT, then KILL 20 s later)
  local name=$1 budget=$(($2 * stretch)) left start status
  shift 2
  left=$((deadline - ($(date +%s) - started)))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    say "$name: skipped (${left} s left of the ${deadline} s deadline)"
    return 1
  fi
  say "$name: start (at most $budget s)"
  start=$(date +%s)
  timeout -s INT -k 20 "$budget" "$@" >"$work/logs/$name.log" 2>&1
  status=$?
  printf '{"stage": "%s", "seconds": %d, "status": %d}\n' "$name" "$(($(date +%s) - start))" \
    "$status" >>"$work/stages.jsonl"
  say "$name: exit $status after $(($(date +%s) - start)) s; last lines:"
  tail -n 4 "$work/logs/$name.log" | tr '\r' '\n' | tail -n 4 | tee -a "$log"
  return "$status"
}

# `siamdiff` for every stage: timeout runs programs, not shell functions, and the machine has
# siamdiff on PYTHONPATH only (no console script).
mkdir -p "$work/bin"
printf '#!/usr/bin/env bash\nexec python3 -m siamdiff "$@"\n' >"$work/bin/siamdiff"
chmod +x "$work/bin/siamdiff"
export PATH=$work/bin:$PATH

keep() {  # keep SOURCE NAME: copy a result into $OUT (flat: the device returns 8 files)
  [ -f "$1" ] && cp "$1" "$out/$2"
}

if [ "${DRY_RUN:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$carry"/wheels/*.whl >>"$log" 2>&1 || say "wheel install failed"
  export PYTHONPATH=/tmp/site:$PYTHONPATH
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$log" 2>&1
fi
python3 -c "import torch, diffusers, siamdiff; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'siamdiff', siamdiff.__version__, 'cuda', torch.cuda.is_available())" \
  2>&1 | tee -a "$log"

stage bench "${BENCH_S:-210}" python3 -m siamdiff.bench "${bench_args[@]}" --device "$device" \
  --out "$work/bench"
keep "$(ls -t "$work"/bench/*.json 2>/dev/null | head -n 1)" bench.json
keep "$(ls -t "$work"/bench/*.md 2>/dev/null | head -n 1)" bench.md

data=$work/data run=$work/run
stage prepare 60 siamdiff prepare --source kvasir-seg="$carry/data/Kvasir-SEG" \
  --source cvc-clinicdb="$carry/data/CVC-ClinicDB" --out "$data" --size "$size" \
  --workers "$workers" || { pack; return 1; }
stage train "${TRAIN_S:-120}" siamdiff train "$config" run_dir="$run" data.root="$data" \
  data.latent_cache="$work/latents.lmdb" autoencoder.path="$carry/taef2" \
  train.max_steps="$train_steps" train.checkpoint_every=100000 train.sample_every=200
# A time-boxed run ends by SIGINT: its checkpoint is saved, its curve is drawn here. Its
# preview grids (every 200 steps) check sampling on CUDA inside training; the last is kept.
[ -s "$run/losses.jsonl" ] && python3 -c \
  "import sys; from siamdiff.report import save_loss_curve as s; s(sys.argv[1], sys.argv[2])" \
  "$run/losses.jsonl" "$out/loss_curve.png" 2>>"$log"
stage export 60 siamdiff export "$run" "$work/model" || { pack; return 1; }
stage sample 60 siamdiff sample "$work/model" --masks "$data:train" --out "$work/syn" \
  --limit "$sample_masks" --per-mask 2 --batch-size "$batch" --device "$device"
keep "$work/syn/samples.png" samples.png
stage segmenter 75 siamdiff train-segmenter "$data" --out "$work/segmenter" --size "$size" \
  --epochs "$seg_epochs" --batch-size "$batch" --device "$device" --workers "$workers"
stage evaluate 60 siamdiff evaluate "$data" "$work/syn" --out "$work/eval/metrics.json" \
  --segmenter "$work/segmenter" --run "$run" --device "$device" --workers "$workers"
keep "$work/eval/metrics.json" metrics.json
if [ "${DRY_RUN:-0}" != 1 ]; then  # accelerate runs DeepSpeed on CUDA only
  stage deepspeed 60 bash "$repo/experiments/gpu_session/deepspeed_check.sh" "$config" "$data" \
    "$work/latents.lmdb" "$carry/taef2" "$work"
fi
# train-vae under bf16 autocast on CUDA (issue 3's "an autoencoder the project trains itself"):
# its speed, and held-out PSNR after a short run, in details.tar.gz (vae/training.json).
stage train-vae 45 siamdiff train-vae "$data" --out "$work/vae" --steps "$vae_steps" \
  --size "$vae_size" --device "$device" --workers "$workers"
pack
}

pack() {  # everything small that explains the numbers, in one file
  keep "$(ls "$run"/samples/*.png 2>/dev/null | tail -n 1)" train_samples.png
  (cd "$work" && tar -czf "$out/details.tar.gz" stages.jsonl logs \
    $(ls -d run/losses.jsonl run/config.yaml eval syn/manifest-v1.json segmenter/segmenter.json \
      data/manifest-v1.json vae/training.json 2>/dev/null))
  say "done: $(ls "$out" | tr '\n' ' ')"
}
main "$@"
