#!/usr/bin/env bash
# siamdiff train-vae on the real polyp data (Kvasir-SEG + CVC-ClinicDB) at CPU scale, and its
# held-out reconstructions against the two autoencoders that need no training here: TAEF2
# (pretrained, ../shared/weights) and the weight-free DCT of the tiny demo backbone.
# Usage (from the repository root): bash experiments/train_vae_cpu/run.sh
# Knobs (environment): STEPS, WIDTHS, CROP, BATCH, LR. Reruns resume the training.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${SHARED:-$(cd "$here/../../.." && pwd)/shared}
work=${WORK:-$here/out}            # git-ignored: data, the trained autoencoder
steps=${STEPS:-800}
widths=${WIDTHS:-16,32,64,64}
crop=${CROP:-64}
batch=${BATCH:-8}
lr=${LR:-5e-4}
# One intra-op thread: on 2 shared cores, OpenMP spin-waiting makes 2 threads slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$work"
if [ ! -f "$work/data/manifest-v1.json" ]; then
  siamdiff prepare --source kvasir-seg="$shared/data/Kvasir-SEG" \
    --source cvc-clinicdb="$shared/data/CVC-ClinicDB" --out "$work/data" --size 128
fi
resume=()
[ -d "$work/vae/checkpoint" ] && resume=(--resume)
if [ ! -f "$work/vae/config.json" ]; then
  start=$(date +%s)
  siamdiff train-vae "$work/data" --out "$work/vae" --size "$crop" --widths "$widths" \
    --batch-size "$batch" --steps "$steps" --lr "$lr" ${resume[@]+"${resume[@]}"}
  echo $(($(date +%s) - start)) >"$work/train_seconds"
fi
cp "$work/vae/loss_curve.png" "$here/loss_curve.png"
python3 "$here/compare.py" --data "$work/data" --vae "$work/vae" --taef2 "$shared/weights/taef2" \
  --out "$here" --train-seconds "$(cat "$work/train_seconds")"
