"""Data parallelism for the training loop over a torch.distributed process group (the Ray Train
workers of `sa-engine train --address`). Without a process group every function is a no-op, so
one process runs the same loop.

The gradients are averaged once per step, after the step's last backward pass, in one all-reduce.
DDP's wrapper is not used because a step back-propagates once per interactive round (11 in the
paper), which keeps only one round's graph alive: about 1 GB at 1024 px with 8 masks, where one
summed backward pass (what DDP's one-forward-one-backward contract needs) took about 8 GB
(measured on the bundled model). The arithmetic is DDP's: the mean over workers, and
`find_unused_parameters`' rule that a parameter no worker used in the step keeps no gradient, so
AdamW leaves it alone as it does in one process.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_state(module: torch.nn.Module) -> None:
    """Give every worker rank 0's parameters and buffers (DDP does the same when it wraps a model)."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the workers, in one all-reduce.

    A parameter without a gradient on a worker counts as a zero gradient there; one that no
    worker gave a gradient keeps `grad=None`.
    """
    import torch.distributed as dist

    _, world = rank_and_world()
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads] + [used])
    dist.all_reduce(flat)
    sizes = [p.numel() for p in params] + [len(params)]
    *parts, used = flat.split(sizes)
    for param, part, count in zip(params, parts, used.tolist()):
        param.grad = (part / world).view_as(param).to(param.dtype) if count > 0 else None


def mean_over_workers(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """The mean of each value over the workers (the values themselves in one process)."""
    import torch.distributed as dist

    _, world = rank_and_world()
    if world == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / world).tolist()


def gather(value: Any) -> list[Any]:
    """`value` of every worker, by rank (picklable values; `[value]` in one process)."""
    import torch.distributed as dist

    _, world = rank_and_world()
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out
