#!/usr/bin/env bash
# Train the embedded x4 upscaler (shapes 16x16 -> 64x64, pixel space) and score it.
#
#   scripts/train-upscaler.sh OUT [SECONDS] [MAX_STEPS]
#
# The U-Net (`shapes-sr`, 2.3M parameters) trains on random 32x32 crops of shapes:64 (the
# low-res input is cut from the same place): a step on 32 crops measured 7.5x faster than on
# 32 whole 64x64 images on a CPU. It upscales whole images. Training stops at MAX_STEPS (default 5000)
# or after SECONDS (default 4500), whichever comes first: at the budget `timeout` sends
# SIGTERM and the trainer saves a checkpoint and the model folder and exits 130. The steps
# reached are in model.json ("training.step"); `--max-steps` with that number reproduces the
# run. Then `eval superres` scores it against bicubic on 256 held-out images.
# To ship it: cp OUT/model.json OUT/model.safetensors src/latentforge/assets/upscaler/
set -euo pipefail
out=${1:?usage: $0 OUT [SECONDS] [MAX_STEPS]}
seconds=${2:-4500}
max_steps=${3:-5000}
export PYTHONUNBUFFERED=1

rc=0
timeout -s TERM -k 90 "$seconds" python3 -m latentforge.cli train diffusion \
    --task superres --scale 4 --crop 32 --data shapes:64 --preset shapes-sr --prediction v \
    --batch-size 32 --lr 1e-3 --warmup-steps 200 --max-steps "$max_steps" \
    --sample-every 0 --ckpt-every 250 --quiet --out "$out" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 130 ]; then
    echo "training failed with status $rc" >&2
    exit "$rc"
fi
python3 - "$out" <<'PY'
import json, sys
print(sys.argv[1], "step", json.load(open(sys.argv[1] + "/model.json"))["training"]["step"])
PY
python3 -m latentforge.cli eval superres --model "$out" --n 256 --quiet
