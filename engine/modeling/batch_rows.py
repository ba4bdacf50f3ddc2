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
of Meta's size and in padded calls of increasing size, each of Meta's positions against each
position of the call); most layers need no padding at all, the 1024-wide product about half of
Meta's batch. A kernel may also round a row by where it lies in its call (an AMD EPYC rounds the
last prompt of a 3-prompt call apart from the first two): where no padded call matches every
position, each prompt's rows are computed at their own position of a call of Meta's size
(`at_positions` says where they are). Prompt tokens are a few rows a prompt against the image
side's 4096, whose products do not depend on the batch (checked against one call over the whole
batch in `tests/test_amg.py`).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import nn

_AS_BATCH_OF: ContextVar[int | None] = ContextVar("as_batch_of", default=None)
# each prompt's position in Meta's call (-1: a padding prompt); None: 0, 1, 2, ... as they come
_POSITIONS: ContextVar[tuple[int, ...] | None] = ContextVar("positions", default=None)
# (layer shape, call shape, Meta's prompts, dtype, device, threads) -> prompts to compute a call
# at, or None: only at the prompts' own positions in a call of Meta's size
_PADDED: dict[tuple, int | None] = {}


@contextlib.contextmanager
def as_batch_of(prompts: int | None) -> Iterator[None]:
    """Within the block, `linear` computes prompt-side layers as part of a batch of `prompts`
    prompts (None: as they come)."""
    token = _AS_BATCH_OF.set(prompts)
    try:
        yield
    finally:
        _AS_BATCH_OF.reset(token)


@contextlib.contextmanager
def at_positions(positions: list[int] | None) -> Iterator[None]:
    """Within the block, the call's prompts sit at these positions of Meta's batch (-1: padding,
    whose rows are not needed). A kernel may round a row by where it lies in the call (on an AMD
    EPYC a call of 3 prompts rounds the last one's 7 rows apart from the first two's)."""
    token = _POSITIONS.set(None if positions is None else tuple(int(p) for p in positions))
    try:
        yield
    finally:
        _POSITIONS.reset(token)


def batch_of() -> int | None:
    """The batch size `as_batch_of` set (None: none)."""
    return _AS_BATCH_OF.get()


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for prompt-side `x` (B x ... x C, one entry of dim 0 per prompt) with the bits of
    its rows in a call over the batch size of `as_batch_of`, at the positions of `at_positions`."""
    weight = layer.weight
    key = ("linear", tuple(weight.shape), layer.bias is not None, weight.dtype, str(weight.device))
    return rowwise(layer, x, key)


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, key: tuple) -> torch.Tensor:
    """`fn(x)` for a product `fn` that maps each prompt's rows on their own (a linear layer, a
    projection), computed as `linear` says; `key` names `fn`'s weights (shape, dtype, device)."""
    prompts = _AS_BATCH_OF.get()
    if prompts is None or x.shape[0] > prompts or x.shape[0] == 0:
        return fn(x)
    positions = _POSITIONS.get()
    if positions is None:
        positions = tuple(range(x.shape[0]))
    if len(positions) != x.shape[0]:
        raise ValueError(f"{len(positions)} positions for a call of {x.shape[0]} prompts")
    if positions == tuple(range(prompts)):
        return fn(x)  # Meta's own call
    count = padded_prompts(fn, x, prompts, key)
    if count is None:
        return _in_place(fn, x, positions, prompts)
    if count == x.shape[0]:
        return fn(x.contiguous())  # as measured: rows in their own contiguous call
    return _padded(fn, x, count)


def _padded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, count: int) -> torch.Tensor:
    padding = x.new_zeros((count - x.shape[0], *x.shape[1:]))
    return fn(torch.cat([x, padding]))[: x.shape[0]]


def _in_place(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, positions: tuple[int, ...], prompts: int
) -> torch.Tensor:
    """Each prompt's rows at its own position of a call of Meta's size (zeros elsewhere); prompts
    of one position (from different batches of Meta's) take one such call each."""
    out = None
    todo = [i for i, p in enumerate(positions) if p >= 0]
    while todo:
        taken: dict[int, int] = {}
        for i in todo:
            taken.setdefault(positions[i], i)
        rows = list(taken.values())
        at = torch.tensor(list(taken), device=x.device)
        call = x.new_zeros((prompts, *x.shape[1:]))
        call[at] = x[rows]
        result = fn(call)
        if out is None:
            out = result.new_zeros((x.shape[0], *result.shape[1:]))
        out[rows] = result[at]
        done = set(rows)
        todo = [i for i in todo if i not in done]
    if out is None:  # only padding
        return fn(x)
    return out


@torch.no_grad()
def padded_prompts(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, prompts: int, key: tuple
) -> int | None:
    """The fewest prompts (a multiple of len(x), or `prompts`) a call of `fn` over inputs shaped as
    `x` must be padded to for each of its rows to equal that row at any position of a call over
    `prompts` prompts; None when none does (not even Meta's size: its rows round by where they
    lie).

    Measured on random rows, each of Meta's positions against each of the call's; a kernel that
    rounds differently differs on random data, so equality there means the same kernel."""
    shape = tuple(x.shape)
    real = shape[0]
    full_key = (*key, shape, prompts, x.dtype, torch.get_num_threads())
    if full_key not in _PADDED:
        generator = torch.Generator().manual_seed(0)
        rows = torch.randn((prompts, *shape[1:]), generator=generator, dtype=x.dtype).to(x.device)
        want = fn(rows)
        # a window of `real` rows slid over Meta's positions, from hanging off the front to
        # hanging off the back: each pair (call position, Meta position) is met once
        shifted = []
        for at in range(1 - real, prompts):
            lo, hi = max(at, 0), min(at + real, prompts)
            window = rows.new_zeros((real, *shape[1:]))
            window[lo - at : hi - at] = rows[lo:hi]
            shifted.append((window, lo - at, hi - at, want[lo:hi]))
        _PADDED[full_key] = next(
            (
                count
                for count in [*range(real, prompts, real), prompts]
                if all(
                    torch.equal(_padded(fn, window, count)[a:b], expected)
                    for window, a, b, expected in shifted
                )
            ),
            None,
        )
    return _PADDED[full_key]
