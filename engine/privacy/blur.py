"""The blur that cannot be undone: pixelate (many-to-one) then Gaussian, inside enlarged boxes.

A Gaussian alone is a linear filter that deconvolution can partly invert when noise is low; the
default "pixelate" mode first averages each region down to a coarse grid (`PIXELATE_CELLS` cells
across its shorter side), which discards the information for good, and then blurs so no block
edge or face outline survives. Faces get an elliptical region inscribed in the enlarged box
(deface's shape), plates a rectangle.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from engine.privacy.detectors import Detection

PIXELATE_CELLS = 6


def enlarge(box: Iterable[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Scale an XYXY box by `margin` about its centre, round outwards and clip to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * margin / 2, (y1 - y0) * margin / 2
    return (
        max(0, int(np.floor(cx - hw))),
        max(0, int(np.floor(cy - hh))),
        min(width, int(np.ceil(cx + hw))),
        min(height, int(np.ceil(cy + hh))),
    )


def region_mask(det: Detection, margin: float, width: int, height: int) -> np.ndarray:
    """HxW bool mask of the area blurred for one detection (ellipse for faces, box otherwise)."""
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = enlarge(det.box, margin, width, height)
    if x1 <= x0 or y1 <= y0:
        return mask
    if det.kind != "face":
        mask[y0:y1, x0:x1] = True
        return mask
    bx0, by0, bx1, by1 = (float(v) for v in det.box)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    ax, ay = max((bx1 - bx0) * margin / 2, 0.5), max((by1 - by0) * margin / 2, 0.5)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    mask[y0:y1, x0:x1] = ((xs + 0.5 - cx) / ax) ** 2 + ((ys + 0.5 - cy) / ay) ** 2 <= 1.0
    return mask


def blur_regions(
    rgb: np.ndarray,
    detections: list[Detection],
    *,
    margin: float = 1.3,
    mode: str = "pixelate",
    strength: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """Blur every detection's enlarged region.

    Arguments:
      rgb (np.ndarray): HxWx3 uint8 (not modified).
      detections (list[Detection]): boxes XYXY in rgb's pixels.
      margin (float): box enlargement about its centre. mode: "pixelate" or "gaussian".
      strength (float): Gaussian sigma as a fraction of the region's shorter side.
    Returns:
      (tuple): the blurred HxWx3 uint8 image and the HxW bool mask of blurred pixels.
    """
    import cv2

    if mode not in ("pixelate", "gaussian"):
        raise ValueError(f"blur mode '{mode}': use 'pixelate' or 'gaussian'")
    h, w = rgb.shape[:2]
    out = rgb.copy()
    covered = np.zeros((h, w), bool)
    for det in detections:
        x0, y0, x1, y1 = enlarge(det.box, margin, w, h)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = region_mask(det, margin, w, h)[y0:y1, x0:x1]
        crop = out[y0:y1, x0:x1]
        rh, rw = crop.shape[:2]
        if mode == "pixelate":
            cells = max(1.0, min(rh, rw) / PIXELATE_CELLS)
            small = cv2.resize(
                crop, (max(1, round(rw / cells)), max(1, round(rh / cells))), interpolation=cv2.INTER_AREA
            )
            crop = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_NEAREST)
        sigma = max(1.0, strength * min(rh, rw))
        blurred = cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REPLICATE)
        out[y0:y1, x0:x1][mask] = blurred[mask]
        covered[y0:y1, x0:x1] |= mask
    return out, covered
