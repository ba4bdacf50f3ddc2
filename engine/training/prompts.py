"""Prompt sampling for the interactive training simulation (SAM paper, appendix A): the first
prompt is a point inside the mask or its box with noise (10% of the side, at most 20 px), the next
ones are points drawn uniformly from the error region of the previous prediction (a missed pixel
gives a positive click, a false one a negative click)."""

from __future__ import annotations

import numpy as np
import torch


def first_point(target: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A point drawn uniformly from the mask. target: HxW bool. Returns (x, y) in pixels."""
    ys, xs = np.nonzero(target)
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def noisy_box(
    target: np.ndarray, rng: np.random.Generator, noise: float = 0.1, max_noise: float = 20.0
) -> np.ndarray:
    """The mask's XYXY box with each coordinate moved by N(0, noise * side), at most `max_noise`.

    Arguments:
      target (np.ndarray): HxW bool.
      noise (float): std of the shift as a share of the box side.
      max_noise (float): bound on the shift, pixels of `target`'s frame.
    Returns:
      (np.ndarray): 4 float XYXY, clipped to the image.
    """
    ys, xs = np.nonzero(target)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    shift = np.clip(rng.normal(0, 1, 4) * noise * sides, -max_noise, max_noise)
    box = box + shift
    height, width = target.shape
    box[[0, 2]] = np.clip(box[[0, 2]], 0, width - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, height - 1)
    return np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])


def error_points(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One corrective click per prompt, uniform over its error region.

    Arguments:
      pred (torch.Tensor): BxHxW bool previous prediction.
      target (torch.Tensor): BxHxW bool reference.
      valid (torch.Tensor): HxW bool, the image area (padding excluded).
    Returns:
      (np.ndarray): Bx2 float (x, y) clicks; a prompt without errors gets a click inside its mask.
      (np.ndarray): B labels, 1 where the click is a missed pixel, 0 where it is a false one.
    """
    errors = ((pred ^ target) & valid).cpu().numpy()
    truth = target.cpu().numpy()
    coords = np.zeros((len(errors), 2))
    labels = np.zeros(len(errors))
    for i, error in enumerate(errors):
        ys, xs = np.nonzero(error if error.any() else truth[i])
        j = int(rng.integers(len(ys)))
        coords[i] = (xs[j], ys[j])
        labels[i] = float(truth[i, ys[j], xs[j]])
    return coords, labels
