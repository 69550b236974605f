#!/usr/bin/env bash
# Train the embedded default model: an f4 KL autoencoder, then a text-conditioned latent U-Net,
# both on shapes:64:holdout (the HELD_OUT colour/shape pairs never appear in training).
#
#   scripts/train-default-model.sh OUT [VAE_SECONDS] [DIFFUSION_SECONDS] [MAX_STEPS]
#
# Each stage trains until MAX_STEPS (default: unbounded) or its time budget, whichever comes
# first: at the budget `timeout` sends SIGTERM and the trainer finishes its step, saves a
# checkpoint and the model folder, and exits 130. The steps reached are in model.json
# ("training.step"); `--max-steps` with that number reproduces the run without a budget.
# Uses the GPU when there is one (LATENTFORGE_DEVICE overrides), bf16 autocast.
# VAE=DIR skips the VAE stage and trains the U-Net in the latent space of that VAE folder.
# Every training caption is encoded once by MiniLM before the U-Net stage (--cache-text) and
# kept with the latents in OUT/cache, so a rerun or --resume skips the encoding. The U-Net
# stage is the embedded model's recipe (docs/text-to-image.md): preset tiny, batch BATCH
# (default 64), lr 1e-3, cosine decay to MAX_STEPS when it is given.
set -euo pipefail
out=${1:?usage: $0 OUT [VAE_SECONDS] [DIFFUSION_SECONDS] [MAX_STEPS]}
vae_seconds=${2:-150}
diffusion_seconds=${3:-330}
max_steps=${4:-1000000}
# cosine decay needs a known end: only with MAX_STEPS (the embedded model: 7000, batch 64)
schedule=constant
[ -n "${4:-}" ] && schedule=cosine
export PYTHONUNBUFFERED=1
data=${DATA:-shapes:64:holdout}  # a dry run on CPU: DATA=shapes:64:300:holdout BF16=--no-bf16
bf16=${BF16:---bf16}  # bf16 autocast: fast on GPUs, very slow on CPUs without bf16 units

stage() {  # stage SECONDS COMMAND...: 0 when it finished or was stopped at its budget
    local seconds=$1 rc=0
    shift
    timeout -s TERM -k 90 "$seconds" "$@" || rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 130 ]; then
        echo "stage failed with status $rc: $*" >&2
        return "$rc"
    fi
}

report() {  # the steps reached and what model.json measured
    python3 - "$1" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/model.json"))
print(sys.argv[1], "step", m["training"]["step"], "eval", m.get("eval"), flush=True)
PY
}

t0=$SECONDS
vae=${VAE:-$out/vae}
if [ -z "${VAE:-}" ]; then
    stage "$vae_seconds" python3 -m latentforge.cli train vae --data "$data" --preset f4-tiny \
        --batch-size 64 --lr 1e-3 $bf16 --max-steps "$max_steps" --sample-every 0 \
        --ckpt-every 2000 --quiet --out "$vae"
fi
report "$vae"
echo "vae stage: $((SECONDS - t0)) s"

t1=$SECONDS
stage "$diffusion_seconds" python3 -m latentforge.cli train diffusion --data "$data" \
    --cond text --vae "$vae" --cache-latents --cache-text --cache-dir "$out/cache" \
    --preset tiny --prediction v --batch-size "${BATCH:-64}" --lr 1e-3 --warmup-steps 300 \
    --lr-schedule "$schedule" $bf16 --max-steps "$max_steps" --sample-every 0 --ckpt-every 500 \
    --quiet --out "$out/t2i"
report "$out/t2i"
echo "diffusion stage: $((SECONDS - t1)) s"
