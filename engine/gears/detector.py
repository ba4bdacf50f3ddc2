"""Gear 2's class-agnostic "object" box detector: a small head on the SAM image embedding.

The SAM paper trained a box detector on gear-1 masks (all one class, "object") to prefill images
with confident masks. Here the detector reads the image embedding the gears already store
(1x256x64x64, one cell per 16x16 pixels of the 1024 px input), so it adds a few hundred
thousand multiply-adds per image and no second backbone. It is CenterNet-shaped: per cell an
objectness logit (a Gaussian peak at each box centre, focal loss) and the distances from the
cell centre to the box's four sides (log-space L1 at the centre cells); two coordinate channels
let a shallow head know where it is. Decoding keeps local maxima above a score threshold and
removes overlapping boxes (IoU NMS).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.checks import invalid

CELL = 16  # pixels of the 1024 px input per embedding cell


@dataclass
class DetectorConfig:
    """The detector and its training (the `semi:` config block, with the prefill settings).

    score_threshold: keep boxes whose objectness is at least this ("confident" objects).
    nms_iou: drop a box overlapping a higher-scoring one by more than this IoU.
    max_boxes: at most this many boxes per image.
    hidden: channels of the head. steps, lr, weight_decay: AdamW training on gear-1 boxes.
    min_box: boxes smaller than this (pixels, either side, original frame) are left out of
      training and of the output.
    seed: training is deterministic for a given seed and data.
    """

    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_boxes: int = 50
    hidden: int = 48
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-4
    min_box: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.score_threshold < 1.0:
            raise invalid("semi.score_threshold", self.score_threshold, "a score in (0, 1)")
        if not 0.0 < self.nms_iou <= 1.0:
            raise invalid("semi.nms_iou", self.nms_iou, "an IoU in (0, 1]")
        for name in ("max_boxes", "hidden", "steps"):
            if getattr(self, name) < 1:
                raise invalid(f"semi.{name}", getattr(self, name), "a whole number >= 1")
        if not self.lr > 0:
            raise invalid("semi.lr", self.lr, "a learning rate > 0")
        for name in ("weight_decay", "min_box"):
            if getattr(self, name) < 0:
                raise invalid(f"semi.{name}", getattr(self, name), "a value >= 0")


class ObjectDetector(nn.Module):
    """Bx256x64x64 embeddings -> (Bx1x64x64 objectness logits, Bx4x64x64 log side distances)."""

    def __init__(self, embed_dim: int = 256, hidden: int = 48) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(embed_dim + 2, hidden, 1)
        self.body = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4),
            nn.ReLU(),
        )
        self.objectness = nn.Conv2d(hidden, 1, 1)
        self.sides = nn.Conv2d(hidden, 4, 1)
        nn.init.constant_(self.objectness.bias, -4.0)  # start by predicting "no object"

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = embeddings.shape
        ys = torch.linspace(-1, 1, h, device=embeddings.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=embeddings.device).view(1, 1, 1, w).expand(b, 1, h, w)
        x = F.relu(self.reduce(torch.cat([embeddings, xs, ys], dim=1)))
        x = self.body(x) + x
        return self.objectness(x), self.sides(x)


@dataclass
class TrainedDetector:
    """A detector with what it was trained on (saved next to the store's gear-2 outputs)."""

    model: ObjectDetector
    config: DetectorConfig
    encoder_fingerprint: str
    trained_on: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from engine.atomic import atomic_path

        with atomic_path(path) as tmp:
            torch.save(
                {
                    "state_dict": self.model.state_dict(),
                    "config": asdict(self.config),
                    "encoder_fingerprint": self.encoder_fingerprint,
                    "trained_on": self.trained_on,
                },
                tmp,
            )

    @classmethod
    def load(cls, path: str | Path) -> "TrainedDetector":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            known = {f.name for f in fields(DetectorConfig)}
            config = DetectorConfig(**{k: v for k, v in data["config"].items() if k in known})
            model = ObjectDetector(hidden=config.hidden)
            model.load_state_dict(data["state_dict"], strict=True)
        except (OSError, KeyError, RuntimeError, TypeError) as exc:
            raise ValueError(f"{path}: not a detector saved by TrainedDetector.save ({exc})") from None
        return cls(model.eval(), config, data["encoder_fingerprint"], data.get("trained_on", {}))


def heat_targets(
    boxes: torch.Tensor, grid: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets of one image from its boxes (Nx4 XYXY, 1024 px input frame).

    Returns:
      (torch.Tensor): 64x64 heatmap in [0, 1], 1 at each box's centre cell.
      (torch.Tensor): 4x64x64 log(1 + side distance / CELL) at centre cells, 0 elsewhere.
      (torch.Tensor): 64x64 bool, the cells where the side distances are supervised.
    """
    heat = torch.zeros(grid, grid)
    sides = torch.zeros(4, grid, grid)
    where = torch.zeros(grid, grid, dtype=torch.bool)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * CELL
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        i, j = min(grid - 1, int(cy // CELL)), min(grid - 1, int(cx // CELL))
        sigma = max(0.7, 0.12 * math.sqrt(max(x1 - x0, 1) * max(y1 - y0, 1)) / CELL)
        d2 = ((centres - cx) / CELL).pow(2)[None, :] + ((centres - cy) / CELL).pow(2)[:, None]
        heat = torch.maximum(heat, torch.exp(-d2 / (2 * sigma**2)))
        heat[i, j] = 1.0
        for di in (-1, 0, 1):  # the centre cell and its neighbours regress the sides
            for dj in (-1, 0, 1):
                a, b = i + di, j + dj
                if 0 <= a < grid and 0 <= b < grid:
                    px, py = centres[b].item(), centres[a].item()
                    if x0 <= px <= x1 and y0 <= py <= y1:
                        d = torch.tensor([px - x0, py - y0, x1 - px, y1 - py])
                        sides[:, a, b] = torch.log1p(d.clamp(min=0) / CELL)
                        where[a, b] = True
    return heat, sides, where


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), per box centre."""
    p = torch.sigmoid(logits).clamp(1e-5, 1 - 1e-5)
    pos = heat.eq(1).float()
    pos_loss = -torch.log(p) * (1 - p).pow(2) * pos
    neg_loss = -torch.log(1 - p) * p.pow(2) * (1 - heat).pow(4) * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def train_detector(
    samples: list[tuple[torch.Tensor, torch.Tensor]],
    config: DetectorConfig,
    encoder_fingerprint: str,
    trained_on: dict[str, Any] | None = None,
) -> tuple[TrainedDetector, list[float]]:
    """Fit the detector to gear-1 boxes.

    Arguments:
      samples: (1x256x64x64 embedding, Nx4 XYXY boxes in the 1024 px input frame) per image.
    Returns:
      (TrainedDetector): the trained detector (eval mode).
      (list[float]): the loss at every step.
    """
    if not samples:
        raise ValueError("no gear-1 masks to train the detector on: run `sa-engine run assisted` first")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = ObjectDetector(samples[0][0].shape[1], config.hidden)
    embeddings = torch.cat([e for e, _ in samples])
    targets = [heat_targets(b, embeddings.shape[-1]) for _, b in samples]
    heat = torch.stack([t[0] for t in targets])[:, None]
    sides = torch.stack([t[1] for t in targets])
    where = torch.stack([t[2] for t in targets])[:, None].expand_as(sides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batch = min(8, len(samples))
    losses = []
    model.train()
    for step in range(config.steps):
        idx = torch.randperm(len(samples), generator=generator)[:batch]
        lr = config.lr * min(1.0, (step + 1) / 20)  # short warm-up
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, pred = model(embeddings[idx])
        loss = focal_loss(logits, heat[idx])
        mask = where[idx]
        if mask.any():
            loss = loss + F.l1_loss(pred[mask], sides[idx][mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    info = {**(trained_on or {}), "images": len(samples), "boxes": int(sum(len(b) for _, b in samples))}
    info["loss_first_last"] = [losses[0], losses[-1]]
    return TrainedDetector(model, config, encoder_fingerprint, info), losses


@torch.no_grad()
def detect(
    detector: TrainedDetector, embedding: torch.Tensor, input_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident boxes on one image.

    Arguments:
      embedding (torch.Tensor): 1x256x64x64.
      input_size (tuple[int, int]): (h, w) of the image in the 1024 px input frame.
    Returns:
      (torch.Tensor): Kx4 XYXY boxes, 1024 px input frame, clipped to the image.
      (torch.Tensor): K scores, highest first.
    """
    cfg = detector.config
    logits, pred = detector.model(embedding)
    heat = torch.sigmoid(logits)[0, 0]
    peaks = (heat == F.max_pool2d(heat[None, None], 3, 1, 1)[0, 0]) & (heat >= cfg.score_threshold)
    h, w = input_size
    ii, jj = torch.nonzero(peaks, as_tuple=True)
    inside = (ii * CELL < h) & (jj * CELL < w)
    ii, jj = ii[inside], jj[inside]
    scores = heat[ii, jj]
    d = torch.expm1(pred[0][:, ii, jj].clamp(max=8)).clamp(min=0) * CELL  # 4xK
    cx, cy = (jj.float() + 0.5) * CELL, (ii.float() + 0.5) * CELL
    boxes = torch.stack([cx - d[0], cy - d[1], cx + d[2], cy + d[3]], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    order = torch.argsort(scores, descending=True)
    keep = box_nms(boxes[order], cfg.nms_iou)[: cfg.max_boxes]
    return boxes[order][keep], scores[order][keep]


def box_nms(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of boxes (Kx4 XYXY, sorted by score) kept by greedy NMS."""
    keep: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    for i in range(len(boxes)):
        if keep:
            k = torch.tensor(keep)
            lt = torch.maximum(boxes[k, :2], boxes[i, :2])
            rb = torch.minimum(boxes[k, 2:], boxes[i, 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=1)
            iou = inter / (areas[k] + areas[i] - inter).clamp(min=1e-6)
            if bool((iou > iou_threshold).any()):
                continue
        keep.append(i)
    return torch.tensor(keep, dtype=torch.long)
