#!/usr/bin/env bash
# LIVR on Qwen2.5-VL-72B-Instruct (configs/livr_qwen2_5_vl_72b.yaml), both stages, DeepSpeed ZeRO-3,
# on NODES 8-GPU nodes (default 2 = 16 ranks). Run from the repository root, with the training
# environment active, the checkpoint at the config's model.path (or --set model.path=...) and the
# shards in shards/<task>. Edit PARTITION / TIME / NODES / DS for your cluster.
#
#   slurm/examples/qwen2_5_vl_72b_zero3.sh                  # submit the chain (Stage 1, then Stage 2)
#   slurm/examples/qwen2_5_vl_72b_zero3.sh --dry-run        # print the sbatch commands only
#   NODES=1 slurm/examples/qwen2_5_vl_72b_zero3.sh          # one node: the paper's global batch 8
#   DS=ds_configs/zero3_offload.json slurm/examples/...     # optimizer state in CPU memory
#
# Arguments are submit.sh options (--dry-run, --set k=v, --account A, --name N, -- sbatch options).
#
# Memory (`livr-ds plan`, docs/performance.md "Memory plans for the released backbones"): ZeRO-2
# does not fit (every rank would hold the 137 GiB of bf16 weights); ZeRO-3 needs about 32 GiB per
# GPU on 16 x 80 GiB (41 GiB on 8). Gradient checkpointing is on in the config.
#
# DeepSpeed config: submit.sh --ds (both stages; it reaches slurm/train.sbatch as LIVR_DS_CONFIG
# through sbatch's --export=ALL,..., which shows in the --dry-run lines).
#
# Global batch: the paper's 8 cannot be spread over 16 ranks at micro batch 1 (the trainer refuses
# it at start-up). With NODES > 1 this script sets optim.global_batch_size = 8 x NODES (16 on 2
# nodes: micro batch 1 x 16 ranks, no accumulation): twice the paper's samples per optimizer step,
# half its optimizer steps per epoch, same lr 1e-4 and 5% warmup fraction. NODES=1 keeps the
# paper's recipe exactly (8 ranks x micro batch 1). Stage 2 runs with --init-from Stage 1's output
# after it (afterok); preempted or timed-out jobs requeue and resume (slurm/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PARTITION=${PARTITION:-gpu}
TIME=${TIME:-48:00:00}
NODES=${NODES:-2}
DS=${DS:-ds_configs/zero3.json}

SETS=()
if [ "$NODES" -gt 1 ]; then
    SETS=(--set "optim.global_batch_size=$((8 * NODES))")
fi

slurm/submit.sh --config configs/livr_qwen2_5_vl_72b.yaml --nodes "$NODES" --gpus-per-node 8 \
    --cpus-per-task 8 --partition "$PARTITION" --time "$TIME" --ds "$DS" "${SETS[@]}" "$@"
