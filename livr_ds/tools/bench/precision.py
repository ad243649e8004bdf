"""How exact a bf16 run's accumulated gradient is: DeepSpeed accumulating in fp32 vs in bf16.

A bf16 run computes each micro-batch's gradient in bf16; what the optimizer receives is their sum
over the step's micro-batches (the paper's 1 x 8 on one GPU sums 8). livr-ds asks DeepSpeed to
accumulate in fp32 (ds_config.py sets `data_types.grad_accum_dtype: fp32` for bf16 unless the user
chose); this benchmark measures what that buys. For each ZeRO config and accumulation dtype, the
real engine runs the trainer's micro-step (NLL sum x 1 / the step's answer tokens, backward with
scale_wrt_gas=False, step() at the boundary) and the gradient the optimizer is handed is read
(`deepspeed.utils.safe_get_full_grad`, inside step(), before the update). It is compared with

- `vs_exact_sum`: the same engine's own gradient of each micro-batch alone (the same config at one
  micro-batch per step, each loss scaled by the whole step's answer tokens as in the step),
  summed in float64: the error the accumulation itself adds;
- `vs_fp32_run`: the same micro-batches through the model built in float32: everything a bf16
  run differs by, compute included (the floor no accumulation dtype removes);
- `engine_vs_plain_model`: the engine's own micro-batch gradients summed exactly vs the plain
  model's (no DeepSpeed): how the engine's backward rounds differently from the plain model's.
  ZeRO-2 computes the plain model's gradient bit for bit; ZeRO-3's forward is bit-identical but
  its backward is a different bf16 rounding (present at one micro-batch, not an accumulation).

All as relative L2 error over all trainable tensors (LoRA and the latent rows).
"""

from __future__ import annotations

import os

import torch

from .fixtures import demo_samples

ZERO_CONFIGS = ("zero2", "zero2_offload", "zero3", "zero3_offload")


def _config(model_path: str, family: str, dtype: str, accumulation: int):
    from ...config import load_config

    return load_config(None, [f"model.family={family}", f"model.path={model_path}", "latents.num=4",
                              "lora.dropout=0.0", f"model.dtype={dtype}", "optim.micro_batch_size=1",
                              f"optim.global_batch_size={accumulation}"])


def _backbone(cfg):
    """The same weights every time: the seed fixes LoRA A, then LoRA B and the latent rows get
    values (B starts at zero, which would leave A without a gradient)."""
    from ...modeling import build_backbone

    torch.manual_seed(0)
    bb = build_backbone(cfg, policy="standard")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name or name == "latent_rows.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return bb


def _answer_tokens(batches) -> int:
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _micro_losses(model, batches, step_tokens: int):
    """The trainer's micro-step losses: each micro-batch's NLL sum over the step's answer tokens."""
    for batch in batches:
        n = (batch["labels"][:, 1:] != -100).sum()
        yield model(batch, policy="standard") * n / step_tokens


def _reference(model_path, family, dtype, batches) -> dict[str, torch.Tensor]:
    """Per-micro-batch gradients of the plain model, summed in float64."""
    bb = _backbone(_config(model_path, family, dtype, len(batches)))
    model = bb.model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for loss in _micro_losses(model, batches, _answer_tokens(batches)):
        for p in params.values():
            p.grad = None
        loss.backward()
        for n, p in params.items():
            total[n] += p.grad.double()
    return total


def _engine_gradient(model_path, family, ds_name, accum_dtype, batches, step_tokens: int) -> dict[str, torch.Tensor]:
    """The gradient DeepSpeed hands its optimizer at the step boundary, as float64."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from ...config import PROJECT_ROOT
    from ...train.ds_config import build_ds_config

    cfg = _config(model_path, family, "bfloat16", len(batches))
    ds = build_ds_config(os.path.join(PROJECT_ROOT, "ds_configs", f"{ds_name}.json"), cfg, world_size=1)
    ds.setdefault("data_types", {})["grad_accum_dtype"] = accum_dtype
    bb = _backbone(cfg)
    engine, *_ = deepspeed.initialize(model=bb.model, config=ds,
                                      model_parameters=[p for p in bb.model.parameters() if p.requires_grad])
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    seen: dict[str, torch.Tensor] = {}
    take_step = engine._take_model_step

    def capture(*args, **kwargs):  # after the boundary's reduction, before the optimizer reads it
        for n, p in params.items():
            seen[n] = safe_get_full_grad(p).detach().double().cpu()
        return take_step(*args, **kwargs)

    engine._take_model_step = capture
    engine.train()
    for loss in _micro_losses(engine, batches, step_tokens):
        engine.backward(loss, scale_wrt_gas=False)
    engine.step()
    engine.destroy()
    return seen


def _engine_exact_sum(model_path, family, ds_name, batches, step_tokens: int) -> dict[str, torch.Tensor]:
    """The engine's gradient of each micro-batch alone (one micro-batch per step), summed in float64."""
    total: dict[str, torch.Tensor] = {}
    for batch in batches:
        for n, g in _engine_gradient(model_path, family, ds_name, "fp32", [batch], step_tokens).items():
            total[n] = total[n] + g if n in total else g
    return total


def _relative_error(got: dict, want: dict) -> float:
    diff = sum(float(((got[n] - want[n]) ** 2).sum()) for n in want)
    norm = sum(float((want[n] ** 2).sum()) for n in want)
    return (diff / norm) ** 0.5


def bench_grad_accum(model_path: str, family: str, data_dir: str, accumulations=(8, 32),
                     configs=ZERO_CONFIGS) -> list[dict]:
    from ...data.collate import LivrCollator
    from ... import distributed as dist

    dist.init("cpu")
    rows = []
    for accumulation in accumulations:
        cfg = _config(model_path, family, "bfloat16", accumulation)
        bb = _backbone(cfg)
        collate = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, cfg.data.max_tokens)
        samples = demo_samples(data_dir, accumulation)
        batches = [collate([s]) for s in samples]
        plain = _reference(model_path, family, "bfloat16", batches)
        fp32 = _reference(model_path, family, "float32", batches)
        step_tokens = _answer_tokens(batches)
        for ds_name in configs:
            row = {"ds_config": ds_name, "micro_batches": accumulation}
            try:
                exact = _engine_exact_sum(model_path, family, ds_name, batches, step_tokens)
            except Exception as e:  # a config DeepSpeed refuses is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
                continue
            for accum_dtype in ("fp32", "bf16"):
                try:
                    got = _engine_gradient(model_path, family, ds_name, accum_dtype, batches, step_tokens)
                except Exception as e:
                    row[f"{accum_dtype}_accum_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                row[f"{accum_dtype}_accum_vs_exact_sum"] = _relative_error(got, exact)
                row[f"{accum_dtype}_accum_vs_fp32_run"] = _relative_error(got, fp32)
            row["engine_vs_plain_model"] = _relative_error(exact, plain)
            row["bf16_compute_floor_vs_fp32_run"] = _relative_error(plain, fp32)
            rows.append(row)
    return rows
