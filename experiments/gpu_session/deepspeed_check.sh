#!/usr/bin/env bash
# DeepSpeed ZeRO-2 through examples/accelerate/deepspeed_zero2.yaml on one GPU (issue 3): a
# short training run that checkpoints, resumes and exports. accelerate runs DeepSpeed on CUDA
# only (siamdiff refuses a DeepSpeed launch on CPUs), so this is where that path is exercised.
#
#   bash experiments/gpu_session/deepspeed_check.sh CONFIG DATA LATENTS TAEF2 WORK
#
# Called by run.sh after its other stages (with their prepared data and latent cache).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
config=$1 data=$2 latents=$3 taef2=$4 work=$5
launch=(python3 -m accelerate.commands.launch --config_file
  "$repo/examples/accelerate/deepspeed_zero2.yaml" --num_processes 1 -m siamdiff train "$config"
  run_dir="$work/ds-run" data.root="$data" data.latent_cache="$latents"
  autoencoder.path="$taef2" train.checkpoint_every=10 train.sample_every=100000
  train.log_every=5)
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
"${launch[@]}" train.max_steps=20
ls -R "$work/ds-run/checkpoints"
"${launch[@]}" train.max_steps=30 --resume
python3 -c "import json, sys; print([r['step'] for r in map(json.loads, open(sys.argv[1]))])" \
  "$work/ds-run/losses.jsonl"
# bf16 runs as torch autocast over fp32 weights (train.configure_deepspeed): fp32 expected.
python3 -c "import glob, sys; from safetensors.torch import load_file as f; w = f(sorted(glob.glob(\
sys.argv[1] + '/checkpoints/step-*/model.safetensors'))[-1]); print('checkpoint weight dtypes', \
sorted({str(v.dtype) for v in w.values()}))" "$work/ds-run"
python3 -m siamdiff export "$work/ds-run" "$work/ds-model"
echo "deepspeed check: trained 20 steps, resumed to 30, exported"
