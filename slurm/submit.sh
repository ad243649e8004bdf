#!/usr/bin/env bash
# Submit one LIVR experiment as a SLURM job chain: Stage 1, then Stage 2 with
# --dependency=afterok:<stage1> initialised from <output.dir>/stage1.
#
#   slurm/submit.sh --config configs/<exp>.yaml [--nodes N] [--gpus-per-node G]
#       [--tasks-per-node T] [--cpus-per-task C] [--partition P] [--time T] [--account A]
#       [--name NAME] [--launcher srun|torchrun] [--ds DEEPSPEED_JSON] [--set k=v ...] [--dry-run]
#       [-- extra sbatch options]
#
# Prints one machine-readable line per submitted job, `stage1=<id>` and `stage2=<id>`
# (+ `output_dir=<dir>`); everything else goes to stderr. Stage 1 is skipped when the config's
# schedule.stage1_epochs is 0 (Direct SFT, latents-only): then Stage 2 has no dependency and
# no --init-from. Tasks per node: --tasks-per-node, else --gpus-per-node (one process per
# GPU), else 1; give --tasks-per-node on CPU partitions. Logs: <output.dir>/logs/<name>-s<N>-<jobid>.out
# (appended across requeues). Run from the directory the config's relative paths are relative
# to (usually the repository root): the jobs run there too. --dry-run prints the sbatch
# commands instead of submitting them. LIVR_PYTHON picks the Python (default: python).
# --launcher torchrun starts one torchrun agent per node instead of one srun task per rank
# (LIVR_LAUNCHER in train.sbatch; slurm/README.md, "Several nodes"). --ds picks the DeepSpeed
# config of both stages (default ds_configs/zero2.json; ZeRO-3: ds_configs/zero3.json).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${LIVR_PYTHON:-python}

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "submit.sh: $*" >&2; exit 2; }

CONFIG="" NODES=1 LAUNCHER="" DS="" GPUS="" TPN="" CPT="" PARTITION="" TIME="" ACCOUNT="" NAME="" DRY=0
SETS=() EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
        --nodes) NODES=${2:?}; shift 2 ;;
        --gpus-per-node) GPUS=${2:?}; shift 2 ;;
        --tasks-per-node|--ntasks-per-node) TPN=${2:?}; shift 2 ;;
        --cpus-per-task) CPT=${2:?}; shift 2 ;;
        --partition|-p) PARTITION=${2:?}; shift 2 ;;
        --time|-t) TIME=${2:?}; shift 2 ;;
        --account|-A) ACCOUNT=${2:?}; shift 2 ;;
        --name) NAME=${2:?}; shift 2 ;;
        --launcher) LAUNCHER=${2:?}; shift 2 ;;
        --ds) DS=${2:?}; shift 2 ;;
        --set) SETS+=("${2:?--set needs key=value}"); shift 2 ;;
        --set=*) SETS+=("${1#--set=}"); shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "submit.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$CONFIG" ] || { echo "submit.sh: --config is required" >&2; usage; }
[ -f "$CONFIG" ] || die "config file not found: $CONFIG"
[ -n "$TPN" ] || TPN=${GPUS:-1}

# output.dir, epochs and name of the config after --set overrides (also validates it).
INFO=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$CONFIG" "${SETS[@]}" <<'EOF'
import os, sys
from livr_ds.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"submit.sh: config error: {e}")
print(os.path.abspath(cfg.output.dir))
print(cfg.schedule.stage1_epochs, cfg.schedule.stage2_epochs)
print(cfg.name)
EOF
) || exit 2
{ read -r OUT_DIR; read -r EPOCHS1 EPOCHS2; read -r CFG_NAME; } <<<"$INFO"
NAME=${NAME:-$CFG_NAME}
LOG_DIR=$OUT_DIR/logs
[ "$DRY" = 1 ] || mkdir -p "$LOG_DIR"  # SLURM does not create the --output directory

# The jobs get this environment (sbatch's default --export=ALL), plus where the code is.
export LIVR_DS_ROOT=$ROOT LIVR_PYTHON=$PYTHON
if [ -n "$DS" ]; then  # the jobs may start in another directory: an absolute path
    case "$DS" in /*) ;; *) DS="$PWD/$DS" ;; esac
    [ -f "$DS" ] || die "--ds: no such DeepSpeed config: $DS"
fi
case "$LAUNCHER" in
    "") ;;
    srun|torchrun) export LIVR_LAUNCHER=$LAUNCHER ;;
    *) die "--launcher must be srun or torchrun, not $LAUNCHER" ;;
esac
COMMON=(--parsable --nodes="$NODES" --ntasks-per-node="$TPN")
# train.sbatch reads LIVR_DS_CONFIG; given as sbatch's --export so it shows in --dry-run
[ -z "$DS" ] || COMMON+=(--export="ALL,LIVR_DS_CONFIG=$DS")
[ -z "$GPUS" ] || COMMON+=(--gpus-per-node="$GPUS")
[ -z "$CPT" ] || COMMON+=(--cpus-per-task="$CPT")
[ -z "$PARTITION" ] || COMMON+=(--partition="$PARTITION")
[ -z "$TIME" ] || COMMON+=(--time="$TIME")
[ -z "$ACCOUNT" ] || COMMON+=(--account="$ACCOUNT")
TRAIN_ARGS=(--config "$CONFIG")
for s in "${SETS[@]}"; do TRAIN_ARGS+=(--set "$s"); done

submit() {  # sbatch options... -- train.sbatch arguments...
    local opts=() ; while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
    local cmd=(sbatch "${COMMON[@]}" "${opts[@]}" "${EXTRA[@]}" "$ROOT/slurm/train.sbatch" "$@")
    if [ "$DRY" = 1 ]; then
        printf '%q ' "${cmd[@]}" >&2; echo >&2
        echo "DRYRUN-${opts[0]#--job-name=}"
        return
    fi
    local out
    out=$("${cmd[@]}") || die "sbatch failed: ${cmd[*]}"
    echo "${out%%;*}"
}

echo "output_dir=$OUT_DIR"
S1=""
if [ "$EPOCHS1" -gt 0 ]; then
    S1=$(submit --job-name="$NAME-s1" --output="$LOG_DIR/%x-%j.out" -- "${TRAIN_ARGS[@]}" --stage 1)
    echo "stage1=$S1"
else
    echo "submit.sh: schedule.stage1_epochs is 0: Stage 2 only" >&2
fi
if [ "$EPOCHS2" -gt 0 ]; then
    DEP=() INIT=()
    if [ -n "$S1" ]; then
        # kill-on-invalid-dep: a failed Stage 1 cancels Stage 2 instead of leaving it pending.
        DEP=(--dependency="afterok:$S1" --kill-on-invalid-dep=yes)
        INIT=(--init-from "$OUT_DIR/stage1")
    fi
    S2=$(submit --job-name="$NAME-s2" --output="$LOG_DIR/%x-%j.out" "${DEP[@]}" -- \
         "${TRAIN_ARGS[@]}" --stage 2 "${INIT[@]}")
    echo "stage2=$S2"
fi
