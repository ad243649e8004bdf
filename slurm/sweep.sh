#!/usr/bin/env bash
# Submit one job chain (slurm/submit.sh) per ablation config.
#
#   slurm/sweep.sh [CONFIG.yaml ...] [submit.sh options: --nodes, --gpus-per-node, --set, ...]
#   slurm/sweep.sh --gpus-per-node 4 --partition gpu --time 24:00:00      # all configs/ablations/*.yaml
#   slurm/sweep.sh configs/ablations/k4.yaml configs/ablations/k8.yaml --gpus-per-node 1
#
# Each ablation file is an experiment YAML with `base:` (its own output.dir), so the chains do
# not share directories. Leading arguments that are files are the configs (default:
# configs/ablations/*.yaml); the rest go to every submit.sh call. Prints one line per config:
#   config=<path> stage1=<id> stage2=<id>         (stage1= absent when it has no Stage 1)
# A config that fails to submit is reported on stderr; the others are still submitted, and the
# exit status is then 1.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIGS=()
while [ $# -gt 0 ] && [ -f "$1" ]; do CONFIGS+=("$1"); shift; done
if [ "${#CONFIGS[@]}" -eq 0 ]; then
    shopt -s nullglob
    CONFIGS=("$ROOT"/configs/ablations/*.yaml)
    [ "${#CONFIGS[@]}" -gt 0 ] || { echo "sweep.sh: no configs/ablations/*.yaml" >&2; exit 2; }
fi

status=0
for cfg in "${CONFIGS[@]}"; do
    if out=$("$ROOT/slurm/submit.sh" --config "$cfg" "$@"); then
        ids=$(grep -E '^stage[12]=' <<<"$out" | tr '\n' ' ')
        echo "config=$cfg ${ids% }"
    else
        echo "sweep.sh: submitting $cfg failed" >&2
        status=1
    fi
done
exit "$status"
