"""The engine's one RLE path: COCO compressed RLE (column-major, as pycocotools encodes it).

Pure functions, no I/O. Every mask the engine writes goes through `encode`; every mask it reads
through `decode`, so a column-major slip can only happen in one place.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict[str, Any]  # {"size": [h, w], "counts": str}

_AREA_CHUNK = 255  # pycocotools 2.0.11 + numpy 2: area() of >= 256 RLEs raises OverflowError


def encode(masks: np.ndarray) -> list[Rle]:
    """Binary masks to COCO compressed RLE.

    Arguments:
      masks (np.ndarray): bool/uint8, HxW or NxHxW.
    Returns:
      (list[dict]): one {"size": [h, w], "counts": str} per mask.
    """
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be HxW or NxHxW, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8, copy=False))
    return [_as_str(rle) for rle in mask_utils.encode(fortran)]


def decode(rles: Rle | Iterable[Rle]) -> np.ndarray:
    """COCO RLE (compressed or uncompressed) to bool masks: HxW for one RLE, NxHxW for a list."""
    if isinstance(rles, dict):
        return mask_utils.decode(_as_bytes(_compressed(rles))).astype(bool)
    rles = [_as_bytes(_compressed(r)) for r in rles]
    if not rles:
        return np.zeros((0, 0, 0), bool)
    if len({tuple(r["size"]) for r in rles}) > 1:
        raise ValueError("decode() of a list needs RLEs of one size; decode them one by one")
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool))


def area(rles: Iterable[Rle]) -> np.ndarray:
    """Foreground pixel count per RLE (int64), without decoding."""
    rles = [_as_bytes(_compressed(r)) for r in rles]
    out = [mask_utils.area(rles[i : i + _AREA_CHUNK]) for i in range(0, len(rles), _AREA_CHUNK)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def bbox_xywh(rles: Iterable[Rle]) -> np.ndarray:
    """Tight box [x, y, w, h] per RLE (float64), as pycocotools computes it."""
    rles = [_as_bytes(_compressed(r)) for r in rles]
    return mask_utils.toBbox(rles).reshape(-1, 4) if rles else np.zeros((0, 4))


def sam_bbox_xywh(rles: Iterable[Rle]) -> np.ndarray:
    """Box [x, y, w, h] per RLE (float64) as SAM's generator writes a record's `bbox`, and so
    SA-1B: from the inclusive XYXY box, (x0, y0, x1 - x0, y1 - y0), one pixel less in w and h than
    pycocotools' tight box (`bbox_xywh`); [0, 0, 0, 0] for an empty mask. Every record the engine
    writes uses it, so a release has one convention whatever path made or resized a mask; the
    COCO export writes the tight box instead, as COCO tools expect."""
    boxes = bbox_xywh(rles)
    boxes[:, 2:] = np.maximum(boxes[:, 2:] - 1, 0)
    return boxes


def iou(rles: list[Rle]) -> np.ndarray:
    """N x N mask IoU of every pair of RLEs of one size (float64), without decoding (pycocotools
    compares boxes first, so masks far apart cost almost nothing)."""
    rles = [_as_bytes(_compressed(r)) for r in rles]
    if not rles:
        return np.zeros((0, 0))
    return np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)), np.float64).reshape(len(rles), -1)


def from_uncompressed(size: tuple[int, int], counts: list[int]) -> Rle:
    """Column-major run lengths (starting with a run of zeros) to compressed RLE."""
    h, w = int(size[0]), int(size[1])
    return _as_str(mask_utils.frPyObjects({"size": [h, w], "counts": list(map(int, counts))}, h, w))


def from_polygons(polygons: list[list[float]], size: tuple[int, int]) -> Rle:
    """COCO polygons ([[x0, y0, x1, y1, ...], ...], pixels) to one compressed RLE of size (h, w),
    rasterised by pycocotools as COCO's own tools do (the parts are merged)."""
    h, w = int(size[0]), int(size[1])
    parts = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not parts:
        raise ValueError("a COCO polygon needs at least 3 points (6 numbers)")
    return _as_str(mask_utils.merge(mask_utils.frPyObjects(parts, h, w)))


def _compressed(rle: Rle) -> Rle:
    if isinstance(rle.get("counts"), list):
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return rle


def _as_str(rle: Rle) -> Rle:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _as_bytes(rle: Rle) -> Rle:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
