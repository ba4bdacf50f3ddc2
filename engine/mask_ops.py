"""Array-in, array-out operations on predicted masks that every consumer of the predictor needs.

Semantics follow Meta's SAM so that scores and boxes agree with SA-1B: the stability score uses
strict `>` at threshold +/- offset, and boxes are INCLUSIVE pixel extents ([0, 0, 0, 0] when empty).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.nn import functional as F


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks binarised at `mask_threshold + offset` and at `mask_threshold - offset`.

    The first mask is contained in the second, so IoU = count(> t + offset) / count(> t - offset).
    Arguments:
      logits (torch.Tensor): ...xHxW mask logits (full resolution).
    Returns:
      (torch.Tensor): ... float32 scores (0/0 gives NaN, as in SAM).
    """
    high = (logits > (mask_threshold + offset)).sum(dim=(-1, -2), dtype=torch.int32)
    low = (logits > (mask_threshold - offset)).sum(dim=(-1, -2), dtype=torch.int32)
    return high / low


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive box [x0, y0, x1, y1] of each ...xHxW bool mask; [0, 0, 0, 0] for an empty mask.

    Returns:
      (torch.Tensor): ...x4 int64 (x1, y1 are the last foreground column / row, not one past it).
    """
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    shape = masks.shape
    flat = masks.reshape(-1, shape[-2], shape[-1])
    height, width = shape[-2:]

    def extent(present: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(size, device=masks.device)[None, :]
        last = (present * index).amax(dim=-1)
        first = torch.where(present, index, size).amin(dim=-1)
        return first, last

    rows = flat.any(dim=-1)
    cols = flat.any(dim=-2)
    y0, y1 = extent(rows, height)
    x0, x1 = extent(cols, width)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    empty = ~rows.any(dim=-1)
    boxes = boxes * (~empty)[:, None]
    return boxes.reshape(*shape[:-2], 4).to(torch.int64)


def box_xyxy_to_xywh(box: torch.Tensor) -> torch.Tensor:
    """SA-1B bbox from an inclusive XYXY box: (x0, y0, x1 - x0, y1 - y0), as Meta's generator writes it."""
    out = box.clone()
    out[..., 2] = box[..., 2] - box[..., 0]
    out[..., 3] = box[..., 3] - box[..., 1]
    return out


class MaskUpsampler:
    """`Sam.postprocess_masks` followed by the generator's thresholds, for a few masks at a time.

    Bit-identical to Meta's path (the same `F.interpolate` calls), with two savings: the first
    resize only produces the rows/columns inside the resized image (the padding is cropped away
    anyway; with a source scale of exactly 1/4 a shorter call reproduces the same samples), and
    logits never outlive their chunk: callers get pixel counts and bool masks.

    Arguments:
      low_res_size (tuple[int, int]): (256, 256) decoder output.
      padded_size (int): encoder input side (1024).
      input_size (tuple[int, int]): (h, w) of the resized image inside the padded square.
      original_size (tuple[int, int]): (H, W) of the image (crop) the masks belong to.
    """

    def __init__(
        self,
        low_res_size: tuple[int, int],
        padded_size: int,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> None:
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.low_res_size = (int(low_res_size[0]), int(low_res_size[1]))
        self.padded_size = int(padded_size)
        factor = padded_size // low_res_size[0]
        exact = padded_size == factor * low_res_size[0] == factor * low_res_size[1]
        self._keep = None
        if exact:
            # low-res rows/cols the valid outputs depend on, plus a margin of 2 (border clamping)
            self._keep = tuple(
                min(low, -(-valid // factor) + 2) for low, valid in zip(low_res_size, input_size)
            )
            self._factor = factor

    @property
    def low_res_needed(self) -> tuple[int, int] | None:
        """(rows, cols) of the low-res logits that `logits` and `window` read (the image's part
        of the padded square, plus the resize's reach); None: all of them."""
        return self._keep

    def logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """Bx256x256 low-res logits -> BxHxW logits at the original size (Meta's arithmetic)."""
        x = low_res[:, None]
        if self._keep is not None:
            rows, cols = self._keep
            x = F.interpolate(
                x[..., :rows, :cols],
                (rows * self._factor, cols * self._factor),
                mode="bilinear",
                align_corners=False,
            )
        else:
            x = F.interpolate(
                x, (self.padded_size, self.padded_size), mode="bilinear", align_corners=False
            )
        x = x[..., : self.input_size[0], : self.input_size[1]]
        return F.interpolate(x, self.original_size, mode="bilinear", align_corners=False)[:, 0]

    def window(self, low_res: torch.Tensor, floor: float) -> "LogitWindow":
        """The part of one mask's full-resolution logits that can exceed `floor`, as `logits` would
        compute it; every logit outside the window is <= `floor`.

        A bilinear sample is a convex combination of its taps, so a full-resolution logit can
        exceed `floor` only where some low-resolution logit it is made of does: the window is what
        the low-resolution cells above `floor` reach through both resizes. Inside it the first
        resize is `F.interpolate` on a slice (exact: scale 1/4) and the second uses PyTorch's own
        taps and weights (`_linear_taps`) in the order of its CPU kernel (`_resample`): the same
        bits as `logits`, at the cost of the window instead of the image (most candidates cover a
        small part of it).

        Arguments:
          low_res (torch.Tensor): 256x256 low-res logits of one mask.
          floor (float): the lowest threshold the caller applies, minus a margin for rounding.
        """
        height, width = self.original_size
        if self._keep is None or width < _VECTOR_WIDTH:
            # (narrow images: PyTorch's resize then runs a scalar loop that rounds differently)
            return LogitWindow(self.logits(low_res[None])[0], 0, 0)
        hot = low_res[: self._keep[0], : self._keep[1]] > floor
        rows = torch.nonzero(hot.any(1))
        if not len(rows):
            return LogitWindow(low_res.new_zeros(0, 0), 0, 0)
        cols = torch.nonzero(hot.any(0))
        y_taps, x_taps = self._taps()
        span_y = _output_span(y_taps, int(rows[0]), int(rows[-1]), self.input_size[0])
        span_x = _output_span(x_taps, int(cols[0]), int(cols[-1]), self.input_size[1])
        (top, bottom), (left, right) = span_y, span_x
        if bottom < top or right < left:
            # the hot cells are only in the resize's margin (past the image's part of the padded
            # square), which no output pixel reads
            return LogitWindow(low_res.new_zeros(0, 0), 0, 0)
        if (bottom - top + 1) * (right - left + 1) * 2 > height * width:  # little to save
            full = self.logits(low_res[None])[0]
            return LogitWindow(full[top : bottom + 1, left : right + 1], top, left)
        # first-resize rows / columns the window's second-resize taps read
        ya, yb = int(y_taps.first[top]), int(y_taps.second[bottom])
        xa, xb = int(x_taps.first[left]), int(x_taps.second[right])
        ra, rb = _source_span(ya, yb, self._keep[0])
        ca, cb = _widen(*_source_span(xa, xb, self._keep[1]), self._keep[1])
        f = self._factor
        mid = F.interpolate(
            low_res[None, None, ra:rb, ca:cb],
            ((rb - ra) * f, (cb - ca) * f),
            mode="bilinear",
            align_corners=False,
        )[0, 0, ya - f * ra : yb - f * ra + 1, xa - f * ca : xb - f * ca + 1]
        out = _resample(mid, y_taps.part(top, bottom, ya), x_taps.part(left, right, xa))
        return LogitWindow(out, top, left)

    def _taps(self) -> tuple["_Taps", "_Taps"]:
        (h_in, w_in), (h_out, w_out) = self.input_size, self.original_size
        return _linear_taps(h_in, h_out), _linear_taps(w_in, w_out)


class LogitWindow(NamedTuple):
    """hxw full-resolution logits of one mask and the window's top-left in the image (crop)."""

    logits: torch.Tensor
    top: int
    left: int


class _Taps(NamedTuple):
    """One axis of a bilinear resize: output i = w0[i] * x[first[i]] + w1[i] * x[second[i]]."""

    first: torch.Tensor
    second: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor

    def part(self, start: int, stop: int, origin: int) -> "_Taps":
        """Outputs start..stop (inclusive), indices relative to input `origin`."""
        s = slice(start, stop + 1)
        return _Taps(self.first[s] - origin, self.second[s] - origin, self.w0[s], self.w1[s])


@functools.lru_cache(maxsize=64)
def _linear_taps(n_in: int, n_out: int) -> _Taps:
    """PyTorch's taps and weights of a bilinear (align_corners=False) resize n_in -> n_out, read
    off `F.interpolate` itself on one-hot rows (so they are its float32 values, not a re-derivation
    that could round differently)."""
    eye = torch.eye(n_in)[:, None, None, :]
    weights = F.interpolate(eye, (1, n_out), mode="bilinear", align_corners=False)[:, 0, 0].T
    nonzero = weights != 0
    first = nonzero.to(torch.uint8).argmax(1)
    two = nonzero.sum(1) > 1
    second = torch.where(two, first + 1, first)
    index = torch.arange(n_out)
    w0 = weights[index, first]
    w1 = torch.where(two, weights[index, second], torch.zeros(()))
    return _Taps(first, second, w0.contiguous(), w1.contiguous())


def _output_span(taps: _Taps, lo: int, hi: int, n_mid: int) -> tuple[int, int]:
    """Output indices start..stop whose value can depend on low-res cells lo..hi (via the x4 first
    resize); stop < start when no output reads them (cells in the margin past the image)."""
    # first-resize index y reads low-res cells max(0, (y - 2) // 4) and the one after it
    mid_lo, mid_hi = max(0, 4 * lo - 2), min(n_mid - 1, 4 * hi + 5)
    start = int(torch.searchsorted(taps.second, mid_lo))
    stop = int(torch.searchsorted(taps.first, mid_hi, right=True)) - 1
    return start, stop


def _source_span(a: int, b: int, n: int) -> tuple[int, int]:
    """Low-res cells [ra, rb) whose x4 resize gives first-resize rows a..b exactly (a margin of
    cells on both sides, so that the slice's border clamping never reaches them)."""
    return max(0, (a - 2) // 4 - 1), min(n, (b - 2) // 4 + 3)


# PyTorch's CPU bilinear resize rounds like `_resample` (fused multiply-adds) only where its
# output rows are at least this wide (measured on torch 2.13: 120 px and up; narrower outputs
# take a scalar loop), so every resize the window computes is kept at least this wide.
_VECTOR_WIDTH = 128


def _widen(start: int, stop: int, limit: int) -> tuple[int, int]:
    """Low-res columns [start, stop) widened to at least _VECTOR_WIDTH / 4 within [0, limit)."""
    cells = _VECTOR_WIDTH // 4
    if stop - start >= cells:
        return start, stop
    if limit <= cells:
        return 0, limit  # the same slice as `logits` resizes
    start = max(0, min(start - (cells - (stop - start)) // 2, limit - cells))
    return start, start + cells


def _resample(x: torch.Tensor, rows: _Taps, cols: _Taps) -> torch.Tensor:
    """Bilinear resample of hxw `x` at the given taps, in the order of PyTorch's CPU kernel (a
    fused multiply-add per tap pair, width first): bit-identical to `F.interpolate`."""
    top, bottom = x.index_select(0, rows.first), x.index_select(0, rows.second)

    def along_width(part: torch.Tensor) -> torch.Tensor:
        a, b = part.index_select(1, cols.first), part.index_select(1, cols.second)
        return torch.addcmul(b * cols.w1, a, cols.w0.expand_as(a))

    upper, lower = along_width(top), along_width(bottom)
    return torch.addcmul(lower * rows.w1[:, None], upper, rows.w0[:, None].expand_as(upper))
