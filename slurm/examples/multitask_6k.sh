#!/usr/bin/env bash
# The paper's multi-task run (configs/livr_multitask_6k.yaml: Qwen3-VL-4B, 6 tasks x 1k samples,
# LIVR 2 + 3 epochs) and its Direct-SFT baseline, on 1 node x 4 GPUs each. Run from the
# repository root, with the training environment active and the shards in shards/<task>
# (`livr-ds shards write ...`). Edit PARTITION / TIME / GPUS for your cluster.
#
#   slurm/examples/multitask_6k.sh                 # submit both chains
#   slurm/examples/multitask_6k.sh --dry-run       # print the sbatch commands only
#
# Each chain: Stage 1 (bottleneck mask), then Stage 2 (standard mask) after it with afterok,
# initialised from runs/livr-multitask-6k/stage1. Preempted or timed-out jobs requeue
# themselves and resume (see slurm/README.md). Logs: runs/<name>/logs/<job>-<id>.out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PARTITION=${PARTITION:-gpu}
TIME=${TIME:-24:00:00}
GPUS=${GPUS:-4}
COMMON=(--nodes 1 --gpus-per-node "$GPUS" --cpus-per-task 8 --partition "$PARTITION" --time "$TIME")

# LIVR: global batch 8 (the config's optim.global_batch_size): on 4 GPUs x micro-batch 1, accumulation 2 is derived.
slurm/submit.sh --config configs/livr_multitask_6k.yaml "${COMMON[@]}" "$@"
# Direct SFT (stage1_epochs: 0): Stage 2 only, no dependency.
slurm/submit.sh --config configs/sft_multitask_6k.yaml "${COMMON[@]}" "$@"
