"""Run under torchrun by tests/test_train.py: train a stage with the real Trainer, then gather every
parameter of the engine's model (ZeRO-3 shards included) and compare it with a freshly built
backbone of the same config, and write which parameters and which embedding rows changed.

    torchrun --nproc_per_node N tests/frozen_probe.py --report R.json --ds D --config C --set k=v ...
"""

import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402

from livr_ds.modeling import build_backbone  # noqa: E402
from livr_ds import distributed as dist  # noqa: E402
from probe_common import start_trainer  # noqa: E402


def main() -> int:
    args, cfg, trainer = start_trainer(resume="none")
    partitioned = sorted(n for n, p in trainer.engine.module.named_parameters() if dist.is_partitioned(p))
    assert trainer.fit() == "done"
    fresh_model = build_backbone(cfg, policy=cfg.policy(), device=trainer.device).model
    fresh = dict(fresh_model.named_parameters())
    changed, frozen_checked = [], 0
    for name, param in trainer.engine.module.named_parameters():
        with dist.gathered([param, fresh[name]]):  # the fresh model is built partitioned too under ZeRO-3
            if not torch.equal(param.detach().cpu(), fresh[name].detach().cpu()):
                changed.append(name)
            frozen_checked += not param.requires_grad
    model = trainer.engine.module
    table = model.hf_model.get_input_embeddings().weight
    fresh_table = fresh_model.hf_model.get_input_embeddings().weight
    with dist.gathered([table, *model.latent_rows.parameters(), fresh_table]):
        ids = torch.arange(table.shape[0], device=table.device)
        with torch.no_grad():
            effective = model.hf_model.get_input_embeddings()(ids)  # the hook places the latent rows
        moved_rows = (effective.cpu() != fresh_table.cpu()).any(-1).nonzero().flatten().tolist()
    if dist.is_main():
        with open(args.report, "w") as f:
            json.dump({"changed": changed, "frozen_checked": frozen_checked, "moved_rows": moved_rows,
                       "latent_ids": sorted(set(trainer.backbone.latent_ids)),
                       "partitioned": partitioned,
                       "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}, f)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
