"""Prompt-side matrix products computed at the row count of another batch size.

A CPU's float32 matrix kernels pick their blocking (and, with several threads, whether to split
the sum over the inner dimension) from the shape, so a row's rounding can depend on how many
rows share the call: the decoder's prompt tokens of 4 prompts (28 rows) round differently from
those of 64 (448 rows), and the predicted IoUs move by ~5e-6, enough to swap two candidates
tied to that precision. Meta's generator runs its decoder on `points_per_batch` prompts at a
time; to reproduce its bits while running fewer prompts per call (smaller calls stay in the
cache; the IoU prefilter drops prompts), the exact path runs each prompt-side linear layer on
its rows padded with zeros to Meta's batch size. Prompt tokens are a few rows a prompt against
the image side's 4096, whose products do not depend on the batch (checked against one call over
the whole batch in `tests/test_amg.py`); the padding still costs ~3% of the generator's time on
the fixture's set A at IoU 0.8 and ~14% in the SA-1B config, where most prompts take this path.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

_AS_BATCH_OF: ContextVar[int | None] = ContextVar("as_batch_of", default=None)


@contextlib.contextmanager
def as_batch_of(prompts: int | None) -> Iterator[None]:
    """Within the block, `linear` computes prompt-side layers as part of a batch of `prompts`
    prompts (None: as they come)."""
    token = _AS_BATCH_OF.set(prompts)
    try:
        yield
    finally:
        _AS_BATCH_OF.reset(token)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for prompt-side `x` (B x ... x C, one entry of dim 0 per prompt), padded with
    zero prompts to the batch size of `as_batch_of` when that is larger."""
    prompts = _AS_BATCH_OF.get()
    if prompts is None or x.shape[0] >= prompts:
        return layer(x)
    padding = x.new_zeros((prompts - x.shape[0], *x.shape[1:]))
    return layer(torch.cat([x, padding]))[: x.shape[0]]
