"""Evaluate a LIVR export (or a base model, zero-shot) on a test split.

    python launch/eval.py --ckpt runs/livr/stage2 --data shards/ --mode standard --out results/livr.json
    python launch/eval.py --base-model /models/Qwen2.5-VL-3B --family qwen2_5_vl --data shards/ --out results/zs.json
    torchrun --nproc_per_node 2 launch/eval.py ...   (or deepspeed / srun: ranks split the samples,
                                                      rank 0 gathers and writes once)

--mode standard | no_latents | bottleneck | bottleneck_no_latents; --probe attention adds the
answer->latent attention measure and latent->image heat maps (<stem>.probes/*.png).
See livr_ds/evaluation/ (cli.py, loop.py) and docs/evaluation.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from livr_ds.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
