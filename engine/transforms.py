"""Longest-side resizing of images, points and boxes into the model's input frame.

The image resize is PIL's bilinear filter on uint8 (antialiased when downscaling), which is what
SAM's preprocessing does; torch's interpolate gives different pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ResizeLongestSide:
    """Resize so the longest side is `target_length`; coordinates follow with the same scale."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(H, W) after resizing so max(H, W) == long_side_length, rounding half up."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> hxwx3 uint8 with max(h, w) == target_length."""
        height, width = self.get_preprocess_shape(
            image.shape[0], image.shape[1], self.target_length
        )
        resized = Image.fromarray(image).resize((width, height), Image.BILINEAR)
        return np.array(resized)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """...x2 (x, y) in the original image -> float64 in the resized frame."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """...x4 XYXY boxes -> Nx4 float64 in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Torch version of `apply_coords`; returns float32 (as Meta's does)."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Torch version of `apply_boxes`: ...x4 XYXY -> Nx4 float32."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW uint8 tensor -> resized with the same PIL filter as `apply_image` (exact parity)."""
        out = [
            torch.from_numpy(self.apply_image(x.permute(1, 2, 0).cpu().numpy())).permute(2, 0, 1)
            for x in image
        ]
        return torch.stack(out).to(image.device)
