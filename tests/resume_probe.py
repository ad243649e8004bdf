"""Run under torchrun by tests/test_train.py: resume a stage with the real Trainer at this world
size, check that the trainable tensors and Adam moments now in the engine equal the checkpoint's
exactly (gathered back from the ZeRO partitions), write what was found, then train on.

    torchrun --nproc_per_node N tests/resume_probe.py --report R.json --config C --set k=v ...
"""

import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from livr_ds.train import checkpoint  # noqa: E402
from livr_ds import distributed as dist  # noqa: E402
from probe_common import start_trainer  # noqa: E402


def main() -> int:
    args, cfg, trainer = start_trainer(resume="auto")
    assert trainer.resumed_from, "nothing to resume from"
    weights, moments, step = checkpoint.gather_train_state(trainer.engine)
    saved_w = load_file(os.path.join(trainer.resumed_from, checkpoint.TRAINABLE))
    saved_m = load_file(os.path.join(trainer.resumed_from, checkpoint.OPTIMIZER))
    report = {
        "resumed_from": trainer.resumed_from,
        "world_size": dist.world_size(),
        "weights_exact": saved_w.keys() == weights.keys() and all(torch.equal(saved_w[k], weights[k]) for k in weights),
        "moments_exact": saved_m.keys() == moments.keys() and all(torch.equal(saved_m[k], moments[k]) for k in moments),
        "n_tensors": len(weights), "n_moments": len(moments),
        "optimizer_step": step, "global_step": trainer.state["global_step"],
        "next_lr": trainer.scheduler.get_last_lr()[0],
        "loader": trainer.loader.state_dict(),
    }
    if dist.is_main():
        with open(args.report, "w") as f:
            json.dump(report, f)
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
