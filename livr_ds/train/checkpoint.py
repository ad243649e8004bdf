"""Resume checkpoints `<stage dir>/checkpoints/step-XXXXXXXX/`: what the run needs to continue.

The trainable tensors and their Adam moments (world-size-free, see below), per-rank RNG state as
JSON, and the trainer state (data position, counters, best metric, metrics line count, wandb run
id), written to a temporary directory and renamed into place only when complete; `--resume auto`
takes the newest complete one. Exports (what a run produces for use) are livr_ds/export/'s.

Nothing here unpickles: our own files are JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import replace_dir, write_json_atomic
from ..latents import full_shape
from .. import distributed as dist
from .faults import fault_point

log = logging.getLogger(__name__)

LATEST = "latest"


# ---- RNG ------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ---- resume checkpoints ---------------------------------------------------------------------
#
# A resume checkpoint holds what trains and nothing else, in a form that does not depend on the
# world size:
#   trainable.safetensors   fp32 master weights of every trainable parameter, by parameter name
#   optimizer.safetensors   their Adam moments (<name>/exp_avg, <name>/exp_avg_sq)
#   trainer_state.json      optimizer step, LR schedule position, data position, counters,
#                           best validation, metrics.jsonl line count, wandb id
#   rng_rank<r>.json        each rank's RNG streams
#   files.json              every file above with its size, written last: a checkpoint without
#                           it, or whose files differ from it, is incomplete or damaged
# The full tensors are gathered from the ZeRO partitions with DeepSpeed's own fragment API
# (deepspeed.utils.safe_get_full_fp32_param / safe_get_full_optimizer_state, ZeRO 1-2, offload
# included) and scattered back the same way, so a checkpoint written at 4 ranks loads at 1 or 8
# with weights, moments, step and schedule intact. DeepSpeed's own save_checkpoint is not used:
# its module file also held frozen weights that exclude_frozen_parameters misses (a tied LM
# head: 683 MB of a 1.1 GB checkpoint for Qwen2.5-VL-3B) and it reloads only at the same world
# size, through an unrestricted torch.load (full unpickling of the .pt files).

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
FILES = "files.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _trainable_named(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _zero_optimizer(engine):
    opt = engine.optimizer
    if _fp32_partitions(opt) is None:
        raise CheckpointError(f"resume checkpoints need a ZeRO stage 1-3 optimizer, got {type(opt).__name__}")
    return opt


def _fp32_partitions(opt) -> list | None:
    """This rank's flat fp32 master partitions, the tensors the inner optimizer keys its state by:
    ZeRO-1/2's single_partition_of_fp32_groups, ZeRO-3's fp32_partitioned_groups_flat."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(opt, attr):
            return getattr(opt, attr)
    return None


def _is_zero3(opt) -> bool:
    return hasattr(opt, "fp32_partitioned_groups_flat")


def gather_train_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Collective. Full fp32 weights and Adam moments of every trainable parameter (on CPU), and
    the optimizer's step count. Moments are empty before the first step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = _zero_optimizer(engine)
    stepped = bool(opt.optimizer.state)
    if stepped and not _is_zero3(opt):
        _link_optimizer_fragments(opt)
    weights, moments = {}, {}
    for name, p in _trainable_named(engine):
        weights[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        if stepped:
            for key in MOMENTS:
                moments[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    step = 0.0
    if stepped:
        first = next(iter(opt.optimizer.state.values()))
        step = float(first["step"])
    return weights, moments, step


def _init_adam_state(opt, step: float) -> None:
    """Create the inner optimizer's per-partition Adam state as torch's AdamW would after
    `step` steps (it creates it lazily on the first step), and link DeepSpeed's fragments to it."""
    inner = opt.optimizer
    for part in _fp32_partitions(opt):
        st = inner.state[part]
        st.setdefault("exp_avg", torch.zeros_like(part, memory_format=torch.preserve_format))
        st.setdefault("exp_avg_sq", torch.zeros_like(part, memory_format=torch.preserve_format))
        if isinstance(inner, torch.optim.Optimizer) and not type(inner).__module__.startswith("deepspeed"):
            st["step"] = torch.tensor(step, dtype=torch.float32)
        else:  # DeepSpeed's CPU Adam counts steps as an int
            st["step"] = int(step)
    if not _is_zero3(opt):  # ZeRO-3 finds the state through the partitions directly
        _link_optimizer_fragments(opt)


def _link_optimizer_fragments(opt) -> None:
    """Point each parameter's DeepSpeed fragment at its slice of the Adam state. DeepSpeed links
    them lazily and not on every step path (ZeRO-2 fp32 never did here), so link before use."""
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def scatter_train_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor],
                        step: float, where: str) -> None:
    """Put full tensors back into the module and this rank's ZeRO partitions (any world size)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = _zero_optimizer(engine)
    named = _trainable_named(engine)
    mine = {n for n, _ in named}
    missing, unexpected = sorted(mine - weights.keys()), sorted(weights.keys() - mine)
    if missing or unexpected:
        raise CheckpointError(f"{where}: trainable tensors do not match this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}): another model, LoRA or latent config?")
    for name, p in named:
        if tuple(weights[name].shape) != full_shape(p):
            raise CheckpointError(f"{where}: {name} has shape {tuple(weights[name].shape)}, the model {full_shape(p)}")
    if moments:
        _init_adam_state(opt, step)
    with torch.no_grad():
        # The working copies (bf16 or fp32, as DeepSpeed leaves them after a step). Under ZeRO-3
        # each is gathered, written by every rank alike, and re-partitioned at exit.
        with dist.gathered([p for _, p in named], modifier_rank=0):
            for name, p in named:
                p.data.copy_(weights[name].to(device=p.device, dtype=p.dtype))
        for name, p in named:
            value = weights[name].to(p.device)
            safe_set_full_fp32_param(p, value)
            for key in MOMENTS if moments else ():
                safe_set_full_optimizer_state(p, moments[f"{name}/{key}"].to(p.device), key)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def check_checkpoint(path: str) -> dict:
    """The trainer state of a complete, undamaged checkpoint, or CheckpointError saying why not."""
    files_json = os.path.join(path, FILES)
    if not os.path.exists(files_json):
        raise CheckpointError(f"{files_json} is missing: the checkpoint was not finished")
    listed = _read_json(files_json)
    for name, size in listed.items():
        f = os.path.join(path, name)
        if not os.path.exists(f):
            raise CheckpointError(f"{f} is missing")
        if os.path.getsize(f) != size:
            raise CheckpointError(f"{f} has {os.path.getsize(f)} bytes, {size} were written: damaged")
    return _read_json(os.path.join(path, TRAINER_STATE))


def list_checkpoints(ckpt_root: str) -> list[str]:
    """Checkpoint directories, newest (highest step) first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [d for d in os.listdir(ckpt_root) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return [os.path.join(ckpt_root, t) for t in sorted(tags, reverse=True)]


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The newest complete checkpoint; damaged or unfinished newer ones are skipped with a warning
    naming the file and the reason."""
    for path in list_checkpoints(ckpt_root):
        try:
            check_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None


def save_resume(engine, ckpt_root: str, tag: str, trainer_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Written into .tmp-<tag>/ and renamed into place, so a crash
    at any point leaves every earlier checkpoint intact and the half-written one never chosen."""
    weights, moments, opt_step = gather_train_state(engine)  # collective: before any early return
    tmp_root = os.path.join(ckpt_root, f".tmp-{tag}")
    staged = os.path.join(tmp_root, tag)
    if dist.is_main():
        shutil.rmtree(tmp_root, ignore_errors=True)
        os.makedirs(staged)
    dist.barrier()
    with open(os.path.join(staged, f"rng_rank{dist.rank()}.json"), "w") as f:
        json.dump(rng_state(), f)
    fault_point("checkpoint_mid_save")
    dist.barrier()
    final = os.path.join(ckpt_root, tag)
    if dist.is_main():
        save_file(weights, os.path.join(staged, TRAINABLE))
        save_file(moments or {"_none": torch.zeros(0)}, os.path.join(staged, OPTIMIZER))
        write_json_atomic(os.path.join(staged, TRAINER_STATE), {**trainer_state, "optimizer_step": opt_step})
        sizes = {n: os.path.getsize(os.path.join(staged, n)) for n in sorted(os.listdir(staged))}
        write_json_atomic(os.path.join(staged, FILES), sizes)
        replace_dir(staged, final)
        shutil.rmtree(tmp_root, ignore_errors=True)
        write_json_atomic(os.path.join(ckpt_root, LATEST), {"tag": tag})  # for people; resume scans the dirs
        _prune(ckpt_root, keep_last, keep=final)
        log.info("saved resume checkpoint %s", final)
    dist.barrier()
    return final


def _prune(ckpt_root: str, keep_last: int, keep: str) -> None:
    """Keep the newest `keep_last` complete checkpoints (the one just written among them)."""
    complete = [p for p in list_checkpoints(ckpt_root) if os.path.exists(os.path.join(p, FILES))]
    for path in complete[max(keep_last, 1):]:
        if os.path.abspath(path) != os.path.abspath(keep):
            shutil.rmtree(path, ignore_errors=True)


def load_resume(engine, path: str) -> dict:
    """Restore a resume checkpoint at any world size: trainable weights, Adam moments and step.
    Returns the trainer state, with this rank's RNG state under "rng" when the world size is
    the saved one (at another world size each rank's random streams cannot be the same ones)."""
    state = check_checkpoint(path)
    tensors = {}
    for name in (TRAINABLE, OPTIMIZER):
        try:
            tensors[name] = load_file(os.path.join(path, name))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{os.path.join(path, name)}: cannot read ({type(e).__name__}: {e})") from None
    moments = {k: v for k, v in tensors[OPTIMIZER].items() if k != "_none"}
    weights = {_current_name(k): v for k, v in tensors[TRAINABLE].items()}
    moments = {"/".join([_current_name(k.rsplit("/", 1)[0]), k.rsplit("/", 1)[1]]): v for k, v in moments.items()}
    scatter_train_state(engine, weights, moments, float(state.get("optimizer_step", 0)),
                        where=os.path.join(path, TRAINABLE))
    if state["world_size"] == dist.world_size():
        state["rng"] = _read_json(os.path.join(path, f"rng_rank{dist.rank()}.json"))
    return state


# Checkpoints written before the latent rows became their own module (livr_ds/latents.py) name
# them as PEFT's trainable-token parameter; the tensor is the same.
_LEGACY_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta.default"


def _current_name(name: str) -> str:
    return "latent_rows.weight" if name.endswith(_LEGACY_ROWS_SUFFIX) else name


def load_resume_weights(model, path: str) -> None:
    """A checkpoint's trainable weights into a plain (non-DeepSpeed) LivrModel, e.g. to compare
    with an export. Names are the engine module's, i.e. LivrModel's own parameter names."""
    tensors = {_current_name(k): v for k, v in load_file(os.path.join(path, TRAINABLE)).items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params:
                raise CheckpointError(f"{os.path.join(path, TRAINABLE)}: {name} is not a parameter of the model")
            params[name].copy_(value.to(params[name].dtype))
