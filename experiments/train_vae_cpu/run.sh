#!/usr/bin/env bash
# siamdiff train-vae on the real polyp data (Kvasir-SEG + CVC-ClinicDB) at CPU scale, and its
# held-out reconstructions against the two autoencoders that need no training here: TAEF2
# (pretrained, ../shared/weights) and the weight-free DCT of the tiny demo backbone.
# Usage (from the repository root): bash experiments/train_vae_cpu/run.sh
# Two autoencoders, 4 latent channels (Stable Diffusion's) and 16 (SD3's and FLUX's), the
# same otherwise. Knobs (environment): LATENTS, STEPS, WIDTHS, CROP, BATCH, LR. Reruns resume
# the training.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${SHARED:-${SIAMDIFF_SHARED:-$(cd "$here/../../.." && pwd)/shared}}
work=${WORK:-$here/out}            # git-ignored: data, the trained autoencoder
steps=${STEPS:-800}
widths=${WIDTHS:-16,32,64,64}
crop=${CROP:-64}
batch=${BATCH:-8}
lr=${LR:-5e-4}
latents=${LATENTS:-4 16}
# One intra-op thread: on 2 shared cores, OpenMP spin-waiting makes 2 threads slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$work"
if [ ! -f "$work/data/manifest-v1.json" ]; then
  siamdiff prepare --source kvasir-seg="$shared/data/Kvasir-SEG" \
    --source cvc-clinicdb="$shared/data/CVC-ClinicDB" --out "$work/data" --size 128
fi
vaes=()
for channels in $latents; do
  vae=$work/vae-$channels resume=()
  [ -d "$vae/checkpoint" ] && resume=(--resume)
  if [ ! -f "$vae/config.json" ]; then
    siamdiff train-vae "$work/data" --out "$vae" --size "$crop" --widths "$widths" \
      --batch-size "$batch" --steps "$steps" --lr "$lr" --latent-channels "$channels" \
      ${resume[@]+"${resume[@]}"}
  fi
  cp "$vae/loss_curve.png" "$here/loss_curve-$channels.png"
  vaes+=(--vae "train-vae $channels ch=$vae")
done
python3 "$here/compare.py" --data "$work/data" --taef2 "$shared/weights/taef2" --out "$here" \
  "${vaes[@]}"
