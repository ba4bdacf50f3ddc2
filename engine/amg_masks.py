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
import torch


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


def masks_to_runs(
    masks: torch.Tensor, top: int, left: int, size: tuple[int, int]
) -> list[np.ndarray]:
    """`window_to_runs` for a batch of masks at once, on their device (an accelerator's path).

    Each mask's column-major edges are found on the device (a zero row above and below every
    column, so each run starts and ends inside its column); only the edge positions in the image
    travel to the host, where runs that continue from one column into the next are joined.

    Arguments:
      masks (torch.Tensor): Nxhxw bool, the masks inside one window.
      top, left (int): the window's position in the image.
      size (tuple[int, int]): (H, W) of the image.
    Returns:
      (list[np.ndarray]): per mask, int64 counts as `window_to_runs` gives them.
    """
    height, width = size
    total = height * width
    columns = masks.transpose(1, 2).to(torch.int8)  # N x w x h: column-major
    edges = torch.diff(torch.nn.functional.pad(columns, (1, 1)), dim=-1)  # N x w x (h+1)
    which, col, row = torch.nonzero(edges, as_tuple=True)  # row-major: in image order per mask
    position = (col + left) * height + row + top
    which, position = which.cpu().numpy(), position.cpu().numpy().astype(np.int64)
    bounds = np.searchsorted(which, np.arange(masks.shape[0] + 1))
    out = []
    for n in range(masks.shape[0]):
        found = position[bounds[n] : bounds[n + 1]]
        starts, ends = found[0::2], found[1::2]
        if not starts.size:
            out.append(np.asarray([total], np.int64))
            continue
        joined = starts[1:] == ends[:-1]  # a run reaching a column's end and the next one's start
        starts = np.concatenate([starts[:1], starts[1:][~joined]])
        ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
        cuts = np.stack([starts, ends], 1).reshape(-1)
        tail = [total] if cuts[-1] < total else []  # no trailing empty run, as window_to_runs
        out.append(np.diff(np.concatenate([[0], cuts, tail])).astype(np.int64))
    return out


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive (x0, y0, x1, y1) of each mask of an Nxhxw bool batch, on its device; -1 rows
    for empty masks."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)

    def first_last(hit: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(length, device=hit.device)
        first = torch.where(hit, index, length).amin(1)
        last = torch.where(hit, index, -1).amax(1)
        return first, last

    y0, y1 = first_last(rows, h)
    x0, x1 = first_last(cols, w)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    return torch.where(rows.any(1)[:, None], boxes, torch.full_like(boxes, -1))
