#!/usr/bin/env bash
# The GPU check for a fresh NVIDIA machine (H100 / H200, Python 3.11, PyPI reachable), run from
# the repository root:
#
#   scripts/gpu-check.sh            # results in ./gpu-results
#   OUT=/some/dir scripts/gpu-check.sh
#
# 1. a venv with torch from PyPI (plain `pip install torch`: its CUDA build; the version and
#    torch.cuda.is_available() are printed and CUDA is required), then `pip install -e .[test]`
#    with torch pinned to that build, so pip cannot swap it for another one;
# 2. tests/test_devices.py (its CUDA cases run where CUDA is);
# 3. `latentforge bench sd` on CUDA at 512 px, 20 steps (dpmpp_2m), fp16 then fp32, against
#    diffusers; the SD-1.5-sized random folders are built once (--cache, a temporary folder,
#    removed at the end) and shared by both runs.
#
# Everything it prints goes under $OUT: one log per step, the two JSON records
# (bench-sd-fp16.json, bench-sd-fp32.json), versions.txt and timings.tsv (seconds per step).
# Budget: under 8 minutes (no compile step); the slowest parts are the torch download (~3 GB)
# and building / saving ~4.3 GB of random weights twice (diffusers' folder and the import).
set -euo pipefail

OUT=${OUT:-gpu-results}
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv-gpu}
TORCH_SPEC=${TORCH_SPEC:-torch}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/timings.tsv"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

CACHE=$(mktemp -d "${TMPDIR:-/tmp}/bench-sd-cache.XXXXXX")
trap 'rm -rf "$CACHE"' EXIT
START=$SECONDS

# step NAME COMMAND...: run it with its output in $OUT/NAME.log (and on the terminal), and
# append "NAME<TAB>seconds<TAB>status" to timings.tsv; a failing step stops the script.
step() {
    local name=$1 t0=$SECONDS rc=0
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$rc" | tee -a "$OUT/timings.tsv"
    if [ "$rc" -ne 0 ]; then
        echo "step $name failed with status $rc (log: $OUT/$name.log)" >&2
        exit "$rc"
    fi
}

# bench NAME ARGS...: `latentforge bench sd ARGS --json`, the JSON alone in $OUT/NAME.json
bench() {
    local name=$1
    shift
    # explicit returns: `set -e` does not apply inside step's `cmd || rc=$?`
    latentforge bench sd "$@" --cache "$CACHE" --json >"$OUT/$name.json" || return $?
    cat "$OUT/$name.json"
}

step venv "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
step pip-upgrade python -m pip install --quiet --upgrade pip
step pip-torch python -m pip install --quiet "$TORCH_SPEC"
step torch-info python -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if not torch.cuda.is_available():
    raise SystemExit("no CUDA: this torch build is CPU-only or the driver is missing")
print("device:", torch.cuda.get_device_name(0))
'
TORCH_VERSION=$(python -c 'import torch; print(torch.__version__)')
echo "torch==$TORCH_VERSION" >"$OUT/constraints.txt"
step pip-project python -m pip install --quiet -e ".[test]" -c "$OUT/constraints.txt"
step versions python -c '
import platform, torch, diffusers, transformers, latentforge
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
print("gpu", torch.cuda.get_device_name(0))
print("diffusers", diffusers.__version__, "transformers", transformers.__version__)
'
cp "$OUT/versions.log" "$OUT/versions.txt"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

step test-devices python -m pytest -q tests/test_devices.py
step bench-sd-fp16 bench bench-sd-fp16 --device cuda --dtype fp16 --size 512 --steps 20 \
    --repeats 3
step bench-sd-fp32 bench bench-sd-fp32 --device cuda --dtype fp32 --size 512 --steps 20 \
    --repeats 3

printf 'total\t%s\t0\n' "$((SECONDS - START))" | tee -a "$OUT/timings.tsv"
echo "results in $OUT"
