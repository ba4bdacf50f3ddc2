"""Prompt-side matrix products computed as part of another batch size's call.

A CPU's float32 matrix kernels pick their blocking (and, with several threads, whether to split
the sum over the inner dimension) from the shape, so a row's rounding can depend on how many
rows share the call: on this project's 2-core machine the token MLP's second product (1024 wide)
of 4 prompts (28 rows) rounds differently from that of 64 (448 rows), and the predicted IoUs move
by ~5e-6, enough to swap two candidates tied to that precision. Meta's generator runs its decoder
on `points_per_batch` prompts at a time; to reproduce its bits while running fewer prompts per call
(smaller calls stay in the cache; the IoU prefilter drops prompts), the exact path runs each
prompt-side linear layer on its rows padded with zero prompts to as many prompts as it takes to
get the rows of Meta's call. How many that is depends on the layer's shape, the thread count and
the kernels, so it is measured once per shape (`padded_prompts`: random rows computed in a call
of Meta's size and in padded calls of increasing size, at every position a call's prompts can
hold in Meta's batch); most layers need no padding at all, the 1024-wide product about half of
Meta's batch. Prompt tokens are a few rows a prompt against the image side's 4096, whose products
do not depend on the batch (checked against one call over the whole batch in `tests/test_amg.py`).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

_AS_BATCH_OF: ContextVar[int | None] = ContextVar("as_batch_of", default=None)
# (layer shape, call shape, Meta's prompts, dtype, device, threads) -> prompts to compute a call at
_PADDED: dict[tuple, int] = {}


@contextlib.contextmanager
def as_batch_of(prompts: int | None) -> Iterator[None]:
    """Within the block, `linear` computes prompt-side layers as part of a batch of `prompts`
    prompts (None: as they come)."""
    token = _AS_BATCH_OF.set(prompts)
    try:
        yield
    finally:
        _AS_BATCH_OF.reset(token)


def batch_of() -> int | None:
    """The batch size `as_batch_of` set (None: none)."""
    return _AS_BATCH_OF.get()


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for prompt-side `x` (B x ... x C, one entry of dim 0 per prompt) with the bits of
    its rows in a call over the batch size of `as_batch_of` (when that is larger)."""
    prompts = _AS_BATCH_OF.get()
    if prompts is None or x.shape[0] >= prompts or x.shape[0] == 0:
        return layer(x)
    count = padded_prompts(layer, tuple(x.shape), prompts)
    if count == x.shape[0]:
        return layer(x.contiguous())  # as measured: rows in their own contiguous call
    return _padded(layer, x, count)


def _padded(layer: nn.Linear, x: torch.Tensor, count: int) -> torch.Tensor:
    padding = x.new_zeros((count - x.shape[0], *x.shape[1:]))
    return layer(torch.cat([x, padding]))[: x.shape[0]]


@torch.no_grad()
def padded_prompts(layer: nn.Linear, shape: tuple[int, ...], prompts: int) -> int:
    """The fewest prompts (a multiple of shape[0], at most `prompts`) a call over `shape`-shaped
    inputs must be padded to for its rows to equal those of a call over `prompts` prompts.

    Measured on random rows at every offset a call's prompts can take in the larger call; a kernel
    that rounds differently differs on random data, so equality there means the same kernel."""
    real = shape[0]
    weight = layer.weight
    key = (
        tuple(weight.shape), layer.bias is not None, shape, prompts,
        weight.dtype, str(weight.device), torch.get_num_threads(),
    )
    if key not in _PADDED:
        generator = torch.Generator().manual_seed(0)
        rows = torch.randn((prompts, *shape[1:]), generator=generator, dtype=weight.dtype)
        rows = rows.to(weight.device)
        want = layer(rows)
        found = prompts
        for count in range(real, prompts, real):
            if all(
                torch.equal(_padded(layer, rows[at : at + real], count), want[at : at + real])
                for at in range(prompts - real + 1)
            ):
                found = count
                break
        _PADDED[key] = found
    return _PADDED[key]
