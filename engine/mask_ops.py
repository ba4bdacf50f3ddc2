"""Array-in, array-out operations on predicted masks that every consumer of the predictor needs.

Semantics follow Meta's SAM so that scores and boxes agree with SA-1B: the stability score uses
strict `>` at threshold +/- offset, and boxes are INCLUSIVE pixel extents ([0, 0, 0, 0] when empty).
"""

from __future__ import annotations

import torch


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
