"""SAM's training losses (paper appendix A): focal : dice = 20 : 1 on the mask logits, MSE between
the predicted IoU and the real IoU, and only the lowest-loss multimask output back-propagated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Per-mask sigmoid focal loss (Lin et al.), mean over pixels.

    Arguments:
      logits (torch.Tensor): BxKxHxW mask logits.
      target (torch.Tensor): Bx1xHxW float {0, 1} (broadcast over K).
    Returns:
      (torch.Tensor): BxK.
    """
    target = target.expand_as(logits)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss: 1 - (2|P.T| + eps) / (|P| + |T| + eps). Shapes as `focal_loss`."""
    prob = torch.sigmoid(logits).flatten(2)
    target = target.expand_as(logits).flatten(2)
    inter = (prob * target).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + target.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of the binarised masks (logits > threshold) with the target: BxK, no gradient."""
    with torch.no_grad():
        pred = (logits > threshold).flatten(2)
        gt = (target > 0.5).expand_as(logits).flatten(2)
        inter = (pred & gt).sum(-1).float()
        union = (pred | gt).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


@dataclass
class LossOutput:
    """Attributes:
    total (torch.Tensor): scalar loss to back-propagate.
    mask (torch.Tensor): scalar focal+dice loss of the chosen outputs (for logging).
    iou (torch.Tensor): scalar IoU-prediction MSE.
    chosen (torch.Tensor): B index of the lowest-loss output per prompt.
    chosen_iou (torch.Tensor): B real IoU of the chosen output.
    """

    total: torch.Tensor
    mask: torch.Tensor
    iou: torch.Tensor
    chosen: torch.Tensor
    chosen_iou: torch.Tensor


def sam_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
) -> LossOutput:
    """The SAM loss on K outputs per prompt: min over K of (20 focal + dice), plus IoU MSE.

    The IoU head is trained on every output (its score ranks the multimask outputs at inference);
    the mask loss flows only through the lowest-loss output of each prompt.

    Arguments:
      logits (torch.Tensor): BxKxHxW mask logits.
      iou_pred (torch.Tensor): BxK predicted IoU.
      target (torch.Tensor): Bx1xHxW float {0, 1} reference masks at the logits' resolution.
    """
    per_output = focal_weight * focal_loss(logits, target) + dice_weight * dice_loss(logits, target)
    best = per_output.detach().argmin(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    mask_term = per_output[rows, best].mean()
    real_iou = mask_iou(logits, target)
    iou_term = F.mse_loss(iou_pred, real_iou)
    total = mask_term + iou_weight * iou_term
    return LossOutput(total, mask_term.detach(), iou_term.detach(), best, real_iou[rows, best])
