"""Process-group helpers: rank, world size, barriers, gathers and batch-wide normalisers.

Every function works unchanged outside a distributed job (one process: rank 0 of 1), so code
that calls them does not branch on whether ``torch.distributed`` was initialised.

Why :func:`global_mean_count` exists: a loss divided by a count that varies per image (the
foreground anchors of RetinaNet, the foreground RoIs of the mask head) is normalised per
process. DistributedDataParallel then averages the per-process gradients, which weighs a
process with few foreground samples as much as one with many, so N processes with B images
each would not train like one process with N*B images. Dividing by the count summed over the
processes, divided by N, makes the averaged gradient exactly that of the whole batch.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Union

import torch
import torch.distributed as dist

__all__ = ["all_gather", "broadcast_object", "get_local_rank", "get_rank", "get_world_size",
           "global_mean_count", "is_distributed", "is_main_process", "reduce_mean",
           "synchronize"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_local_rank() -> int:
    """Rank within this machine (``LOCAL_RANK``, set by :func:`segkit.engine.launch`)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if get_world_size() > 1 else 0


def is_main_process() -> bool:
    """Rank 0: the process that writes files (checkpoints, metrics, results, pictures)."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes (no-op in one process)."""
    if is_distributed():
        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather(obj: Any) -> List[Any]:
    """Every process's ``obj`` (any picklable object), in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (e.g. rank 0's results or output folder)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_mean(values: Dict[str, float]) -> Dict[str, float]:
    """The mean over processes of each value (one all-reduce for the whole dict).

    Used for logging: every process then logs, and checks for NaN, the same numbers, so a
    non-finite loss on one process stops all of them at the same iteration instead of leaving
    the others waiting in the next all-reduce.
    """
    if not is_distributed() or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values.keys(), t.tolist()))


def global_mean_count(count: Union[int, float, torch.Tensor]) -> float:
    """``count`` summed over the processes and divided by their number (module docstring).

    Args:
        count: this process's number of samples a loss is summed over (int, float or a
            scalar tensor, e.g. ``fg_mask.sum()``).

    Returns:
        A float; equal to ``count`` in one process. Every process must call this at the same
        point of its forward pass (it is a collective), also when its own count is 0.
    """
    if isinstance(count, torch.Tensor):
        count = float(count.detach().sum())
    if not is_distributed():
        return float(count)
    t = torch.tensor([float(count)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
