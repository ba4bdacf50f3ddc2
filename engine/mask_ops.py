"""Array-in, array-out operations on predicted masks that every consumer of the predictor needs.

Semantics follow Meta's SAM so that scores and boxes agree with SA-1B: the stability score uses
strict `>` at threshold +/- offset, and boxes are INCLUSIVE pixel extents ([0, 0, 0, 0] when empty).
"""

from __future__ import annotations

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
