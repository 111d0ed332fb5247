#!/usr/bin/env bash
# siamdiff train on the real polyp data (Kvasir-SEG + CVC-ClinicDB), tiny backbone, on CPU.
# Shows the full real-data path on a machine without a GPU: prepare -> TAEF2 latent cache
# -> Siamese-Diffusion training -> loss curve and sample grid (copied next to this script).
# Usage (from the repository root): bash experiments/train_tiny_real_cpu/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${SHARED:-${SIAMDIFF_SHARED:-$(cd "$here/../../.." && pwd)/shared}}
work=${WORK:-$here/out}            # git-ignored: data, run, cache
steps=${STEPS:-200}
# One intra-op thread: on 2 shared cores, OpenMP spin-waiting makes 2 threads slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$work"
if [ ! -f "$work/data/manifest-v1.json" ]; then
  siamdiff prepare --source kvasir-seg="$shared/data/Kvasir-SEG" \
    --source cvc-clinicdb="$shared/data/CVC-ClinicDB" --out "$work/data" --size 128
fi
resume=()
[ -d "$work/run/checkpoints" ] && resume=(--resume)  # an interrupted run goes on
siamdiff train tiny data.root="$work/data" run_dir="$work/run" ${resume[@]+"${resume[@]}"} \
  data.transforms.size=128 data.latent_cache="$work/latents.lmdb" \
  autoencoder.kind=taef2 autoencoder.path="$shared/weights/taef2" \
  train.max_steps="$steps" train.batch_size=8 train.log_every=10 \
  train.checkpoint_every="$steps" train.sample_every="$steps" train.sample_count=8 \
  optim.warmup_steps=30 model.consistency_warmup_steps=100
cp "$work/run/loss_curve.png" "$here/loss_curve.png"
cp "$work/run/samples/step-$(printf %08d "$steps").png" "$here/samples.png"
python3 - "$work/run/losses.jsonl" "$here/results.json" "$steps" <<'PY'
import json, os, platform, sys
from siamdiff.atomic import atomic_write_json
from siamdiff.report import read_loss_log, training_seconds
rows = read_loss_log(sys.argv[1])
first, last = rows[0], rows[-1]
terms = ("loss", "mask", "image", "consistency", "augment")
result = {
    "command": "bash experiments/train_tiny_real_cpu/run.sh",
    "device": f"cpu ({platform.machine()}), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
    "steps": int(sys.argv[3]), "batch_size": 8, "resolution": 128, "backbone": "tiny",
    "autoencoder": "taef2", "train_seconds": round(training_seconds(rows)),
    "loss_first_10_steps": {k: first[k] for k in terms},
    "loss_last_10_steps": {k: last[k] for k in terms},
    "note": "train_seconds: the training steps' own time (loss log), on cores other jobs may share",
}
atomic_write_json(sys.argv[2], result)
print(json.dumps(result, indent=2))
PY
