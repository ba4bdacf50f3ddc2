"""Where the automatic generator looks: point grids, crop boxes, and the crop-edge filter.

Every rule here is Meta's `segment_anything.utils.amg` rule, restated, because SA-1B-compatible
output depends on the exact integer arithmetic (crop lengths, overlaps, the 20 px edge test).
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np


def build_point_grid(n_per_side: int) -> np.ndarray:
    """An n x n grid of points in [0, 1]^2, cell centres, x fastest.

    Returns:
      (np.ndarray): (n*n)x2 float64 (x, y).
    """
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One grid per crop layer; layer k has int(n_per_side / scale_per_layer**k) points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """The full image, then 2^k x 2^k overlapping crops for k = 1..n_layers.

    Arguments:
      image_size (tuple[int, int]): (H, W).
      n_layers (int): crop layers beyond the full image.
      overlap_ratio (float): overlap as a fraction of the short side (split over the crops).
    Returns:
      (list[list[int]]): crop boxes XYXY (exclusive end), full image first, then per layer
        product(x0s, y0s) (x outer, y inner).
      (list[int]): the layer of each box.
    """
    height, width = image_size
    short_side = min(height, width)
    boxes, layers = [[0, 0, width, height]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for layer in range(n_layers):
        n_crops = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w = crop_len(width, n_crops, overlap)
        crop_h = crop_len(height, n_crops, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_crops)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_crops)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
            layers.append(layer + 1)
    return boxes, layers


def near_crop_edge(
    boxes_xyxy: np.ndarray, crop_box: list[int], image_size: tuple[int, int], atol: float = 20.0
) -> np.ndarray:
    """Masks whose box lies within `atol` px of an inner crop edge (one that is not an image edge).

    The inclusive box maximum is compared with the exclusive crop end, as in Meta's generator.
    Arguments:
      boxes_xyxy (np.ndarray): Nx4 inclusive boxes in the IMAGE frame.
      crop_box (list[int]): XYXY crop; image_size (tuple[int, int]): (H, W).
    Returns:
      (np.ndarray): N bool, True = drop.
    """
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    crop = np.asarray(crop_box, np.float64)[None, :]
    image = np.asarray([0, 0, image_size[1], image_size[0]], np.float64)[None, :]
    at_crop = np.abs(boxes - crop) <= atol
    at_image = np.abs(boxes - image) <= atol
    return np.any(at_crop & ~at_image, axis=1)


def surely_near_crop_edge(
    inner_box_xyxy: list[int], crop_box: list[int], image_size: tuple[int, int], atol: float = 20.0
) -> bool:
    """Whether every mask containing the inclusive box `inner_box_xyxy` (image frame) is dropped
    by `near_crop_edge`: a box inside the crop that grows only gets closer to the crop's edges,
    and on a side whose crop edge is more than 2 * atol from the image's, no box coordinate
    within atol of the crop edge is within atol of the image edge.
    """
    image = (0, 0, image_size[1], image_size[0])
    return any(
        abs(inner_box_xyxy[j] - crop_box[j]) <= atol and abs(crop_box[j] - image[j]) > 2 * atol
        for j in range(4)
    )
