"""Process-group set-up and the one place livr-ds issues collectives.

Ranks come from the launcher's environment (deepspeed, torchrun, or srun's SLURM_* variables),
so the same entry point runs under all three.

Every collective livr-ds itself issues goes through this module, and every tensor it sends is
placed by `collective_device`: an NCCL group takes CUDA tensors only (a CPU tensor raises "No
backend type associated with device type cpu"), gloo takes CPU tensors. The object collectives
(gather_objects, broadcast_object) pickle into tensors that torch places on the current CUDA
device for NCCL by itself; they carry our own records only, never data read from shards.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist


def _from_slurm() -> None:
    """srun starts one task per GPU and sets SLURM_PROCID/NTASKS/LOCALID, not RANK etc."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("running under srun without MASTER_ADDR: slurm/train.sbatch exports it "
                           "from the first host of SLURM_JOB_NODELIST")


def init(device_type: str | None = None) -> torch.device:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and return this rank's device."""
    import deepspeed

    _from_slurm()
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if use_cuda:  # before the group exists, so NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                                   timeout=datetime.timedelta(minutes=30))
        # One line per rank (stderr, launched ranks only), as the group sees it: on several nodes a
        # wrong layout (every node rank 0, a node that is not in the group) shows in the job log.
        if dist.get_world_size() > 1 or "SLURM_PROCID" in os.environ:
            print(f"[rank {dist.get_rank()}/{dist.get_world_size()}] host {socket.gethostname()}, local rank "
                  f"{os.environ['LOCAL_RANK']}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
                  f"{dist.get_backend()}", file=sys.stderr, flush=True)
    if use_cuda:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def shutdown() -> None:
    """Tear down the process group if one exists (tools that initialise it for themselves, such as
    the benchmark, leave none behind)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def collective_device(backend: str | None = None) -> torch.device:
    """Where a tensor must live for a collective on a group with `backend` (default: the world's).

    "nccl" -> this rank's CUDA device; "gloo" and mixed groups that route CPU tensors to gloo
    ("cpu:gloo,cuda:nccl") -> CPU. A pure function of the backend name, so it is testable
    without a GPU."""
    if backend is None:
        backend = str(dist.get_backend()) if dist.is_initialized() else "gloo"
    backend = backend.lower()
    if "cpu:" in backend or backend in ("gloo", "mpi"):
        return torch.device("cpu")
    if "nccl" in backend or "cuda:" in backend:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values, op: str = "sum", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All-reduce a vector (list of numbers or a tensor) on the device the group needs; returns a
    CPU tensor. One collective however many values: pack what a step needs into one call."""
    t = torch.as_tensor(values, dtype=dtype).detach()
    if not dist.is_initialized():
        return t.cpu()
    t = t.to(collective_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one (stop signals, NaN losses)."""
    return bool(all_reduce([1.0 if flag else 0.0], op="max")[0] > 0)


def all_sum(values: list[float]) -> list[float]:
    return all_reduce(values).tolist()


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: this rank holds a shard, the full tensor exists only when gathered."""
    return hasattr(param, "ds_id")


def gathered(params, modifier_rank: int | None = None):
    """Context in which ZeRO-3 parameters are whole on every rank (collective: every rank enters
    it with the same parameters); with modifier_rank=r, rank r's in-place changes are scattered
    back at exit. Nothing to do for parameters that are not partitioned (ZeRO 0-2)."""
    import contextlib

    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
