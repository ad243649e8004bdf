"""Run under torchrun by tests/test_guards.py: train with the real Trainer after breaking one thing
the first-step guard must catch, and report what it said.

    GUARD_PROBE_BREAK=lora     one LoRA layer's B output is detached: its A and B get no gradient
    GUARD_PROBE_BREAK=frozen   after the first optimizer step a frozen vision weight is nudged, as a wrong
                               parameter group or a stray in-place write would

    GUARD_PROBE_BREAK=lora torchrun --nproc_per_node N tests/guard_probe.py --report R.json --ds D --config C --set k=v ...
"""

import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

breaking = os.environ["GUARD_PROBE_BREAK"]

import torch  # noqa: E402

from livr_ds import distributed as dist  # noqa: E402
from livr_ds.train.guards import FirstStepGuardError  # noqa: E402
from probe_common import start_trainer  # noqa: E402


def main() -> int:
    args, cfg, trainer = start_trainer(resume="none")
    model = trainer.engine.module
    broken = None
    if breaking == "lora":
        broken, module = next((n, m) for n, m in model.named_modules() if n.endswith("lora_B.default"))
        module.register_forward_hook(lambda mod, inp, out: out.detach())
    else:
        broken, param = next((n, p) for n, p in model.named_parameters() if "visual" in n and not p.requires_grad)
        real_step = trainer.engine.step

        def step_then_nudge(*a, **k):
            real_step(*a, **k)
            with torch.no_grad():
                (param.ds_tensor if dist.is_partitioned(param) else param.data).add_(1e-2)

        trainer.engine.step = step_then_nudge
    message = None
    try:
        trainer.fit()
    except FirstStepGuardError as e:
        message = str(e)
    if dist.is_main():
        with open(args.report, "w") as f:
            json.dump({"broken": broken, "message": message, "step": trainer.state["global_step"]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
