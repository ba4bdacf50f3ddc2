"""Full-resolution masks of the automatic generator kept as run lengths, and their boxes.

SAM's post-processing (`engine.mask_ops.MaskUpsampler`) upsamples the 256x256 low-resolution logits
bilinearly to 1024x1024, crops the valid input region, and resizes bilinearly to the image; the
generator then thresholds the result at 0 (the mask) and at +/- offset (the stability score).
Meta's code does this for a whole batch of candidates at once and keeps every mask at full size
until it is run-length encoded. Here the same arithmetic runs on a few masks at a time, and
candidates are kept as column-major run lengths of the full image (COCO's uncompressed RLE layout):
memory grows with mask boundaries, not with H x W per candidate.
"""

from __future__ import annotations

import numpy as np


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (x0, y0, x1, y1) of a 2-D bool mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def window_to_runs(
    mask: np.ndarray, top: int, left: int, size: tuple[int, int]
) -> np.ndarray:
    """Column-major run lengths (COCO uncompressed RLE counts) of a mask placed in a larger image.

    Arguments:
      mask (np.ndarray): hxw bool, the mask inside its window (may be empty).
      top, left (int): the window's position in the image.
      size (tuple[int, int]): (H, W) of the image.
    Returns:
      (np.ndarray): int64 counts, starting with a (possibly empty) run of zeros.
    """
    height, width = size
    total = height * width
    box = tight_box(mask)
    if box is None:
        return np.asarray([total], np.int64)
    x0, y0, x1, y1 = box
    band = np.zeros((x1 - x0 + 1, height), np.bool_)  # columns of the image, column-major
    band[:, top + y0 : top + y1 + 1] = mask[y0 : y1 + 1, x0 : x1 + 1].T
    flat = band.reshape(-1)
    start = (left + x0) * height
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1 + start
    edges = [np.asarray([start], np.int64)] if flat[0] else []
    edges.append(change)
    if flat[-1] and start + flat.size < total:
        edges.append(np.asarray([start + flat.size], np.int64))
    bounds = np.concatenate([[0], *edges, [total]]).astype(np.int64)
    return np.diff(bounds)


def runs_area(runs: np.ndarray) -> int:
    return int(runs[1::2].sum())


def runs_to_window(
    runs: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], margin: int = 0
) -> tuple[np.ndarray, int, int]:
    """Decode the part of a run-length mask inside an inclusive box (+ margin, clipped).

    Returns:
      (np.ndarray): hxw bool window; (int, int): its top, left in the image.
    """
    height, width = size
    x0, y0, x1, y1 = box
    x0, y0 = max(x0 - margin, 0), max(y0 - margin, 0)
    x1, y1 = min(x1 + margin, width - 1), min(y1 + margin, height - 1)
    start, stop = x0 * height, (x1 + 1) * height
    ends = np.cumsum(runs)
    begins = ends - runs
    lengths = np.clip(np.minimum(ends, stop) - np.maximum(begins, start), 0, None)
    flat = np.repeat(np.arange(runs.size) % 2 == 1, lengths)
    band = flat.reshape(x1 - x0 + 1, height)[:, y0 : y1 + 1]
    return np.ascontiguousarray(band.T), y0, x0


def runs_to_mask(runs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Full HxW bool mask of column-major run lengths."""
    height, width = size
    values = np.arange(runs.size) % 2 == 1
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)
