"""Greedy box NMS with torchvision's exact semantics, in plain torch (the engine has no torchvision).

What decides agreement with SAM's generator: areas (x2 - x1) * (y2 - y1) with NO +1 on the inclusive
boxes, IoU in float32, suppression iff IoU > threshold (strict), and candidates visited in STABLE
descending score order, so equal scores keep their input order. The kept indices come back in
visiting order, which is why the generator's output is re-ordered by every NMS it runs.
"""

from __future__ import annotations

import torch


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, highest score first.

    Arguments:
      boxes (torch.Tensor): Nx4 XYXY (any real dtype; computed in float32).
      scores (torch.Tensor): N scores (ties: lower index first).
      iou_threshold (float): a box is dropped when its IoU with a kept box is > this.
    Returns:
      (torch.Tensor): K int64 indices into boxes, in descending score order.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    boxes = boxes.detach().to("cpu", torch.float32).reshape(-1, 4)
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    boxes = boxes[order]
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1) * (y2 - y1)
    threshold = torch.tensor(iou_threshold, dtype=torch.float32)
    count = boxes.shape[0]
    suppressed = torch.zeros(count, dtype=torch.bool)
    keep = []
    for i in range(count):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = slice(i + 1, count)
        width = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp_min(0)
        height = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp_min(0)
        inter = width * height
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= iou > threshold
    return order[torch.as_tensor(keep, dtype=torch.int64)]
