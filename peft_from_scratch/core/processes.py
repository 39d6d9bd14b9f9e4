"""Which process am I: the few facts of a multi-process run that saving needs (``training.distributed``
runs the training itself). In a single process every function here is a no-op or the obvious answer."""
from __future__ import annotations

import torch
import torch.distributed as dist


def several() -> bool:
    """Whether this process is one of several (an initialised process group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0, and in a single process: where files are written and lines printed."""
    return not several() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if several():
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a ``DTensor``; gathering it is a collective: every rank
    must call this); any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t
