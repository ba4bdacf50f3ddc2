"""Small-region cleanup of the automatic generator (SA-1B: holes and islands under 100 px).

Semantics are Meta's `remove_small_regions`: fill holes first (connected components of the
background, 8-connectivity, smaller than the area), then remove islands (components of the mask
smaller than the area; if every island is small keep the largest). The work runs on the mask's box
plus a 1 px background margin instead of the whole image. That is exact: outside its box a mask is
background, and when the window does not span the image's full width or height, everything outside
it is one background region touching the margin, so the margin's component is as large as the
window part plus all the outside pixels. Other cases fall back to the whole image.
"""

from __future__ import annotations

import numpy as np


def clean_window(
    window: np.ndarray, top: int, left: int, size: tuple[int, int], min_area: int
) -> tuple[np.ndarray, bool] | None:
    """Fill small holes, then drop small islands, of a mask given by its window.

    Arguments:
      window (np.ndarray): hxw bool, the mask's box plus a 1 px margin (clipped to the image).
      top, left (int): the window's position; size (tuple[int, int]): (H, W) of the image.
      min_area (int): regions with fewer pixels are holes/islands to remove.
    Returns:
      (np.ndarray): the cleaned hxw window; (bool): whether anything changed. None when the
        window cannot decide it (it spans the image's width or height): use `clean_mask`.
    """
    height, width = size
    h, w = window.shape
    outside = height * width - h * w
    spans = h == height or w == width
    if spans or outside < min_area:
        return None
    sides = (top > 0, top + h < height, left > 0, left + w < width)
    filled, holes = _fill_holes(window, outside, min_area, sides)
    cleaned, islands = _drop_islands(filled, min_area)
    return cleaned, holes or islands


def clean_mask(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """The same cleanup on a whole-image HxW bool mask (what Meta's code does)."""
    filled, holes = _fill_holes(mask, 0, min_area, (False, False, False, False))
    cleaned, islands = _drop_islands(filled, min_area)
    return cleaned, holes or islands


def _fill_holes(
    mask: np.ndarray, outside: int, min_area: int, sides: tuple[bool, bool, bool, bool]
) -> tuple[np.ndarray, bool]:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), 8)
    sizes = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    # window sides that are not image edges are the margin: background joined to the outside
    edges = [labels[0], labels[-1], labels[:, 0], labels[:, -1]]
    border = np.concatenate([e for e, ring in zip(edges, sides) if ring] or [np.zeros(0, np.int32)])
    for label in np.unique(border[border > 0]):
        sizes[label - 1] += outside
    small = np.flatnonzero(sizes < min_area) + 1
    if small.size == 0:
        return mask, False
    return np.isin(labels, np.concatenate([[0], small])), True


def _drop_islands(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < min_area
    if not small.any():
        return mask, False
    keep = np.flatnonzero(~small) + 1
    if keep.size == 0:
        keep = np.asarray([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True
