"""Checks that stop a run before it trains silently wrong: a non-finite gradient behind a finite
loss, and the first-step guard (what should train did, what should not did not).

Gradients are watched by tensor hooks on the trainable parameters: a hook sees each micro-batch's
local gradient before DeepSpeed reduces or accumulates it, at every ZeRO stage (ZeRO-3 included:
the gradient has the parameter's full shape there). The reduced gradient is a sum of these, so it
is non-finite exactly when some rank's local one is (barring an overflow of the sum itself, which
the loss-side check and DeepSpeed's grad norm would show). The flags stay on the device; the trainer
reads them once per step in its step collective.

The first-step guard spans the first two optimizer steps that apply a learning rate > 0 (warmup
starts at 0): LoRA's B matrices start at zero, so the A matrices get a zero gradient in the first
update and, without weight decay, do not move until the second. It compares this rank's fp32
master fragments (what the optimizer updates; a bf16 working copy may legitimately not change in
a small warmup step) and strided samples of three frozen tensors (a vision-tower weight, the
embedding table, one language-model weight); under ZeRO-3 only local shards are read, nothing is
gathered. One copy of this rank's masters is held for two steps, then dropped.
"""

from __future__ import annotations

import logging

import torch

from .. import distributed as dist
from .faults import nan_gradient_step

log = logging.getLogger(__name__)

GUARD_STEPS = 2
FROZEN_SAMPLE = 4096


class FirstStepGuardError(RuntimeError):
    pass


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter's working copy (a ZeRO-3 shard, else the whole tensor)."""
    return p.ds_tensor if dist.is_partitioned(p) else p.data


def _master_fragment(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's fp32 master fragment of a trainable parameter, or None when it holds none."""
    if dist.is_partitioned(p):
        from deepspeed.utils import safe_get_local_fp32_param

        frag = safe_get_local_fp32_param(p)
        return frag if frag is not None and frag.numel() else None
    mapping = getattr(p, "_hp_mapping", None)
    return mapping.hp_fragment if mapping is not None else None


def _sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // FROZEN_SAMPLE)].clone()


class GradientWatch:
    """Non-finite gradient flags every step; non-zero gradient flags during the guard window."""

    def __init__(self, named_trainable: list[tuple[str, torch.nn.Parameter]], device: torch.device):
        self.names = [n for n, _ in named_trainable]
        self.device = device
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.nonzero = None  # (n,) bool while the guard window is open
        self.step = 0  # optimizer step being computed (1-based)
        self._nan_at = nan_gradient_step()  # a drill (train/faults.py); None in a normal run
        self.handles = [p.register_hook(self._hook(i)) for i, (_, p) in enumerate(named_trainable)]

    def _hook(self, index: int):
        def hook(grad: torch.Tensor):
            if index == 0 and self._nan_at == self.step:
                grad = grad * float("nan")
            self.nonfinite |= ~torch.isfinite(grad).all()
            if self.nonzero is not None:
                self.nonzero[index] |= (grad != 0).any()
            return grad
        return hook

    def begin_step(self, step: int) -> None:
        self.step = step
        self.nonfinite.zero_()

    def open_window(self) -> None:
        self.nonzero = torch.zeros(len(self.names), dtype=torch.bool, device=self.device)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class FirstStepGuard:
    """Snapshot before the first updating step, verdict after the GUARD_STEPS-th."""

    def __init__(self, model, adapter, watch: GradientWatch):
        self.model = model
        self.watch = watch
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.frozen = self._frozen_sample(model, adapter)
        self.updates = 0
        self.done = False
        self.masters = None
        self.frozen_before = None

    @staticmethod
    def _frozen_sample(model, adapter) -> list[tuple[str, torch.nn.Parameter]]:
        named = dict(model.named_parameters())
        by_id = {id(p): n for n, p in named.items()}
        picks = []
        vision = [p for m in adapter.vision_modules(model.hf_model) for p in m.parameters()]
        if vision:
            picks.append(vision[0])
        picks.append(model.hf_model.get_input_embeddings().weight)
        lm = [p for n, p in named.items() if not p.requires_grad and "layers.0." in n and "proj" in n
              and id(p) not in {id(v) for v in vision}]
        if lm:
            picks.append(lm[0])
        return [(by_id[id(p)], p) for p in picks if not p.requires_grad]

    def before_step(self, lr: float) -> None:
        if self.done or lr <= 0:
            return
        if self.updates == 0:
            self.masters = [(_master_fragment(p).clone() if _master_fragment(p) is not None else None)
                            for _, p in self.trainable]
            self.frozen_before = [_sample(_local(p)) for _, p in self.frozen]
            self.watch.open_window()
        self.updates += 1

    def after_step(self) -> None:
        """Collective once, after the window's last step: every rank joins the verdict."""
        if self.done or self.updates < GUARD_STEPS:
            return
        self.done = True
        changed = []
        for (_, p), before in zip(self.trainable, self.masters):
            now = _master_fragment(p)
            changed.append(1.0 if before is not None and not torch.equal(before, now) else 0.0)
        frozen_moved = [0.0 if torch.equal(b, _sample(_local(p))) else 1.0
                        for (_, p), b in zip(self.frozen, self.frozen_before)]
        nonzero = self.watch.nonzero.double().cpu().tolist()
        flags = dist.all_reduce(changed + frozen_moved + nonzero, op="max").tolist()
        n = len(self.trainable)
        changed, frozen_moved, nonzero = flags[:n], flags[n:n + len(self.frozen)], flags[n + len(self.frozen):]
        self.masters = self.frozen_before = None
        self.watch.nonzero = None
        problems = [f"{name} got no non-zero gradient" for (name, _), g in zip(self.trainable, nonzero) if not g]
        problems += [f"{name} did not change" for (name, _), c in zip(self.trainable, changed) if not c]
        problems += [f"frozen {name} changed" for (name, _), m in zip(self.frozen, frozen_moved) if m]
        if problems:
            raise FirstStepGuardError(
                f"first-step guard, after the first {GUARD_STEPS} optimizer steps with lr > 0: "
                + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                + ". Something that should train does not (or the reverse): check lora.target_regex, "
                "model.trainable and the data's answers")
        log.info("first-step guard: all %d trainable tensors got finite non-zero gradients and changed; %d sampled "
                 "frozen tensors (%s) did not", n, len(self.frozen), ", ".join(name for name, _ in self.frozen))
