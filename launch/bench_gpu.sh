#!/usr/bin/env bash
# Every GPU row of docs/performance.md in one run: Stage 1 vs Stage 2 (flex vs flash/sdpa),
# mask construction, packing, and the Qwen2.5-VL-3B / Qwen3-VL-4B architectures with random
# weights (bf16, tokens/s, MFU, memory; evaluation s/sample vs train s/step). Results:
# $OUT/bench_gpu.json (OUT defaults to .).
#
# For a GPU node without network: download the pinned wheels on a machine with one, into .whl/
# of this checkout, and they are installed from there first (the node's python3 holds torch):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 peft==0.21.2 webdataset==1.0.2 braceexpand==0.1.7 tokenizers==0.23.3
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/livr-site .whl/*.whl
    export PYTHONPATH=/tmp/livr-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
for m in ("transformers", "peft", "webdataset", "flash_attn"):
    try:
        print(m, importlib.import_module(m).__version__)
    except ImportError:
        print(m, "NOT INSTALLED")
EOF
# stage, packing, loader and trainer are the CPU rows (tiny model); on a GPU, arch measures Stage 1 vs 2
# per backend and packed vs padded rows on the real-size models.
"$PY" -m livr_ds.cli bench --only mask arch eval --repeats ${REPEATS:-6} \
    --arch ${ARCHS:-qwen2_5_vl_3b qwen3_vl_4b} --out "$OUT/bench_gpu.json" "$@"
