#!/usr/bin/env bash
# Build .carry/ (git-ignored) for experiments/gpu_session/run.sh: what the GPU machine lacks.
#
#   bash experiments/gpu_session/prepare_carry.sh      # here, ~2 min; then the device call (README)
#
# .carry/data: Kvasir-SEG + CVC-ClinicDB shrunk to a 288 px shorter side (JPEG images, PNG
# masks; shrink_sources.py), .carry/taef2: the TAEF2 autoencoder, .carry/wheels: the Python
# packages siamdiff needs that the machine's image does not hold, for its Python 3.12, at the
# versions installed here. Everything must stay under the device's 64 MiB carry limit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${SHARED:-${SIAMDIFF_SHARED:-$(cd "$repo/.." && pwd)/shared}}
carry=$repo/.carry
staging=$carry.partial
rm -rf "$staging"
mkdir -p "$staging/wheels"
python3 "$here/shrink_sources.py" "$shared/data/Kvasir-SEG" "$shared/data/CVC-ClinicDB" \
  --out "$staging/data"
cp -r "$shared/weights/taef2" "$staging/taef2"
# Not in the machine's image (device/KINDS.md); their own needs are there already.
# pydantic and hjson are DeepSpeed's (deepspeed_check.sh); DeepSpeed itself is a source
# release, built here into a pure-Python wheel.
packages=(diffusers omegaconf antlr4-python3-runtime lmdb segmentation-models-pytorch
  torch-fidelity importlib-metadata pydantic pydantic-core annotated-types typing-inspection)
pinned=(hjson==3.1.0)
for name in "${packages[@]}"; do
  pinned+=("$name==$(python3 -c "import importlib.metadata as m; print(m.version('$name'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$staging/wheels" "${pinned[@]}"
python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$staging/wheels"
size=$(du -sm "$staging" | cut -f1)
if [ "$size" -gt 58 ]; then  # the repository's tracked files (~5 MiB) travel too
  echo "prepare_carry.sh: $staging is $size MiB; the carry limit is 64 MiB with the repository" >&2
  exit 1
fi
rm -rf "$carry"
mv "$staging" "$carry"
echo "$carry: $size MiB ($(ls "$carry/wheels" | wc -l) wheels)"
