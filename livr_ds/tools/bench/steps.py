"""Train-step benchmarks on one model: Stage 1 vs Stage 2 per backend, packed vs padded rows."""

from __future__ import annotations

import torch

from .fixtures import demo_samples, tiny_backbone
from .timing import interleaved_medians


def bench_stage(model_path, family, data_dir, batch_size=8, repeats=10, backends=("sdpa", "eager")):
    """Every (backend, stage) pair is timed in one interleaved loop, so load drift hits all alike."""
    from ...data.collate import LivrCollator

    samples = demo_samples(data_dir, batch_size)
    steps, tokens = {}, {}
    for backend in backends:
        bb = tiny_backbone(model_path, family, backend, 4)
        batch = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)(samples)
        model = bb.model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        tokens[backend] = int(batch["input_ids"].numel())

        def step(policy, model=model, opt=opt, batch=batch):
            def run():
                opt.zero_grad(set_to_none=True)
                model(batch, policy).backward()
                opt.step()
            return run

        steps[(backend, "stage1")] = step("bottleneck")
        steps[(backend, "stage2")] = step("standard")
    t = interleaved_medians(steps, repeats)
    return [{"backend": b, "stage1_s": t[(b, "stage1")], "stage2_s": t[(b, "stage2")],
             "ratio": t[(b, "stage1")] / t[(b, "stage2")], "tokens": tokens[b]} for b in backends]


def bench_packing(model_path, family, data_dir, batch_size=16, repeats=5, max_tokens=(512, 1024)):
    """The same samples as padded rows and as packed rows of at most each max_tokens."""
    from ...data.collate import LivrCollator

    bb = tiny_backbone(model_path, family, "sdpa", 4)
    samples = demo_samples(data_dir, batch_size)
    model = bb.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batches = {"padded": LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max(max_tokens))(samples)}
    for n in max_tokens:
        batches[f"packed {n}"] = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, n, packing=True)(samples)

    def step(batch):
        def run():
            opt.zero_grad(set_to_none=True)
            model(batch, "bottleneck").backward()
            opt.step()
        return run

    t = interleaved_medians({k: step(b) for k, b in batches.items()}, repeats)
    rows = []
    for k, b in batches.items():
        real = b["meta"]["tokens"]
        rows.append({"layout": k, "rows": b["input_ids"].shape[0], "row_len": b["input_ids"].shape[1],
                     "real_token_fraction": real / b["input_ids"].numel(), "step_s": t[k],
                     "real_tokens_per_s": real / t[k], "vs_padded": t["padded"] / t[k]})
    return rows
