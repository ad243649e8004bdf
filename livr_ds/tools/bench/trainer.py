"""livr-ds's loop vs transformers Trainer + PEFT + DeepSpeed on the same batches."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch


def bench_vs_trainer(model_path, family, data_dir, rounds=3, steps=5, batch_size=8, work_dir: str | None = None):
    """livr-ds's loop vs transformers Trainer + PEFT + DeepSpeed ZeRO-2 on the same tiny model,
    the same pre-collated batches and global batch, Direct SFT (no latents, standard mask): both
    sides train the same LoRA. The two alternate in `rounds` rounds of `steps` optimizer steps
    (load drift hits both); the first step of each round is warm-up. Median seconds per step."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ...config import PROJECT_ROOT, load_config
    from ...data.collate import LivrCollator
    from ...data.loader import LivrLoader
    from ...data.sources import ShardSource
    from ...modeling import build_backbone
    from ...segments import PAD
    from ... import distributed as dist
    from ...train.ds_config import build_ds_config

    dist.init("cpu")
    cfg = load_config(None, [f"model.family={family}", f"model.path={model_path}", "latents.num=0",
                             "schedule.stage1_epochs=0", "lora.dropout=0.0", "stage=2",
                             f"optim.micro_batch_size={batch_size}", f"optim.global_batch_size={batch_size}"])
    loader = LivrLoader([ShardSource(data_dir)], 0, 1, batch_size=batch_size, seed=0)
    bb = build_backbone(cfg, policy="standard")
    collator = LivrCollator(bb.adapter, bb.processor, [])
    batches = []
    for samples in loader:
        batches.append(collator(samples))
        if len(batches) == steps:
            break
    ds = build_ds_config(os.path.join(PROJECT_ROOT, "ds_configs", "zero2.json"), cfg, world_size=1)
    engine, *_ = deepspeed.initialize(model=bb.model, model_parameters=[p for p in bb.model.parameters()
                                                                       if p.requires_grad], config=ds)
    hf_batches = [{"input_ids": b["input_ids"], "attention_mask": (b["segment_ids"] != PAD).long(),
                   "labels": b["labels"], "mm_token_type_ids": (b["input_ids"] == bb.model.image_token_id).int(),
                   **{k: b[k] for k in bb.adapter.vision_keys if k in b}} for b in batches]
    hf_ds = json.loads(json.dumps(ds))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        hf_ds[key] = "auto"
    ours, theirs = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    for _ in range(rounds):
        times = []
        for batch in batches:  # livr-ds: the trainer's micro-step (mask rule, engine backward, step)
            t = time.perf_counter()
            engine.backward(engine(batch, policy="standard"))
            engine.step()
            times.append(time.perf_counter() - t)
        ours += times[1:]
        # The baseline: HF model + PEFT LoRA (same targets), HF Trainer with the same DeepSpeed JSON.
        torch.manual_seed(cfg.seed)
        hf = get_peft_model(bb.adapter.load_model(bb.path), LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=bb.adapter.lora_target_regex))
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="livr-bench-hf-", dir=work_dir), per_device_train_batch_size=1, max_steps=steps,
            learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, lr_scheduler_type="cosine",
            warmup_steps=1, max_grad_norm=cfg.optim.grad_clip, deepspeed=hf_ds, report_to=[], save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
            use_cpu=True)
        timer = Timer()
        timer.times = []
        Trainer(model=hf, args=args, train_dataset=hf_batches, data_collator=lambda items: items[0],
                callbacks=[timer]).train()
        theirs += timer.times[1:]
    tokens = statistics.median(int((b["segment_ids"] != PAD).sum()) for b in batches)
    a, b = statistics.median(ours), statistics.median(theirs)
    return [{"stack": "livr-ds (DeepSpeed engine loop)", "step_s": a, "tokens_per_s": tokens / a},
            {"stack": "transformers Trainer + PEFT + DeepSpeed", "step_s": b, "tokens_per_s": tokens / b},
            {"stack": "ratio livr-ds / Trainer (steps/s)", "step_s": b / a, "tokens_per_s": None}]
