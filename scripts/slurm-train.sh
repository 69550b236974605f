#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, c10d rendezvous on the first node,
# one rank per GPU, streaming WebDataset shards (docs/training.md, "Several nodes").
#
#   sbatch --nodes 4 scripts/slurm-train.sh OUT 'wds:/shared/laion/{000000..009999}.tar:256'
#
# Rank 0 alone writes OUT (checkpoints, model folder, train_log.jsonl): OUT must be on a file
# system every node sees (a --resume on any node then finds the checkpoints). Each node keeps
# its own --cache-dir under LOCAL_CACHE (node-local disk; the --cache-latents / --cache-text
# tables of in-memory data, written by the node's local rank 0). Resubmitting the same command continues
# the run exactly (--resume; the stream's position is in the checkpoint). Extra arguments go to
# `latentforge train diffusion` (e.g. --fsdp --grad-checkpoint --bf16 for a large U-Net).
#SBATCH --job-name=latentforge
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
set -euo pipefail
out=${1:?usage: sbatch $0 OUT DATA [train diffusion options...]}
data=${2:?usage: sbatch $0 OUT DATA [train diffusion options...]}
shift 2
export GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}} NNODES=$SLURM_JOB_NUM_NODES
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export HEAD PORT=${MASTER_PORT:-29500}
export LOCAL_CACHE=${LOCAL_CACHE:-/tmp/latentforge-$SLURM_JOB_ID}  # per node, not shared
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# --signal=TERM@120: SLURM sends SIGTERM two minutes before the time limit; srun passes it to
# torchrun, whose ranks agree to stop, save a checkpoint and exit 130 (resubmit to go on).
# One torchrun per node (--ntasks-per-node=1); c10d rendezvous at the first node.
srun --kill-on-bad-exit=1 bash -c '
  mkdir -p "$LOCAL_CACHE"
  exec python -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m latentforge.cli train diffusion --resume --cache-dir "$LOCAL_CACHE" "$@"
' bash --data "$data" --out "$out" "$@"
