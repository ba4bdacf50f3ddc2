"""A model-free, deterministic annotator: Otsu threshold + connected components, as SA-1B records.

It stands in for a gear wherever a real, repeatable per-image function is needed without weights
(resume tests, store smoke runs, benchmarks of the shard runner). No model means no predicted IoU:
`predicted_iou` is set to the stability score.
"""

from __future__ import annotations

import numpy as np

from engine import rle
from engine.records import MaskRecord


def classical_masks(
    image: np.ndarray, *, min_area: int = 100, max_masks: int = 64, stability_offset: int = 8
) -> list[MaskRecord]:
    """Masks of the connected regions brighter and darker than the Otsu threshold.

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      min_area (int): drop components smaller than this many pixels.
      max_masks (int): keep the largest ones.
      stability_offset (int): grey levels the threshold is moved by to measure stability
        (share of the mask that stays on the same side of threshold +- offset).
    Returns:
      (list[MaskRecord]): largest first; ids are 0..N-1 (the shard runner assigns final ids);
        bbox/crop_box XYWH, point_coords [[x, y]] at the point farthest from the mask boundary.
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    t, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    candidates = []
    for polarity, side, strict in (
        (1, grey > t, grey > t + stability_offset),
        (0, grey <= t, grey <= t - stability_offset),
    ):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(
            side.astype(np.uint8), connectivity=8
        )
        for label in range(1, n):
            if stats[label, cv2.CC_STAT_AREA] >= min_area:
                candidates.append(
                    (int(stats[label, cv2.CC_STAT_AREA]), polarity, label, labels, strict)
                )
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    records = []
    for area, _, label, labels, strict in candidates[:max_masks]:
        mask = labels == label
        stability = float(np.count_nonzero(mask & strict)) / float(area)
        inner = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(inner)), inner.shape)
        segmentation = rle.encode(mask)[0]
        records.append(
            MaskRecord(
                id=len(records),
                segmentation=segmentation,
                bbox=[float(v) for v in rle.sam_bbox_xywh([segmentation])[0]],
                area=int(area),
                predicted_iou=stability,
                stability_score=stability,
                crop_box=[0.0, 0.0, float(w), float(h)],
                point_coords=[[float(x), float(y)]],
            )
        )
    return records
