"""What one optimizer step is made of: its micro-batches and the one collective that follows them."""

from __future__ import annotations

import dataclasses

from .. import distributed as dist


def accumulation_groups(loader, grad_accum: int):
    """The loader's micro-batches, grad_accum at a time; the last group of an epoch may be short."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


@dataclasses.dataclass
class StepConsensus:
    """Everything the loop decides on after a step, summed over all ranks in one collective: the
    loss, non-finite loss or gradient anywhere, a stop signal anywhere, rank 0's clock for timed
    saves, throughput."""

    loss_sum: float
    nonfinite_loss: float
    nonfinite_grad: float
    stop: float
    save_due: float
    samples: float
    tokens: float
    pad_fraction_sum: float
    micro_batches: float

    @classmethod
    def reduce(cls, local: "StepConsensus") -> "StepConsensus":
        names = [f.name for f in dataclasses.fields(cls)]
        total = dist.all_reduce([getattr(local, n) for n in names]).tolist()
        return cls(**dict(zip(names, total)))
