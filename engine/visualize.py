"""Pictures a person can check masks on: coloured masks with outlines, prompt points and boxes.

Drawing uses cv2 on RGB uint8 arrays; callers encode/write the result (see `encode_png`).
"""

from __future__ import annotations

import numpy as np

PALETTE = [
    (30, 144, 255),
    (255, 140, 0),
    (186, 85, 211),
    (0, 206, 209),
    (255, 215, 0),
    (220, 20, 60),
]
FOREGROUND = (0, 220, 0)
BACKGROUND = (230, 0, 0)
BOX = (255, 255, 0)


def draw_masks(
    image: np.ndarray,
    masks: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    captions: list[str] | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """One panel per mask, side by side: mask tinted and outlined, points (green fg, red bg), box.

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      masks (np.ndarray): NxHxW bool.
      points (np.ndarray | None): Kx2 (x, y) pixels; labels (np.ndarray | None): K, 1 fg / 0 bg.
      box (np.ndarray | None): 4 XYXY pixels.
      captions (list[str] | None): one line of text per panel.
    Returns:
      (np.ndarray): Hx(N*W)x3 uint8 RGB.
    """
    import cv2

    panels = []
    scale = max(image.shape[:2]) / 1000.0
    radius = max(4, int(round(8 * scale)))
    thickness = max(1, int(round(2 * scale)))
    for i, mask in enumerate(np.asarray(masks, dtype=bool)):
        colour = np.array(PALETTE[i % len(PALETTE)], np.float32)
        panel = image.astype(np.float32)
        panel[mask] = (1 - alpha) * panel[mask] + alpha * colour
        panel = np.ascontiguousarray(panel.round().clip(0, 255).astype(np.uint8))
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(panel, contours, -1, tuple(int(c) for c in colour), thickness)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in np.asarray(box).reshape(4))
            cv2.rectangle(panel, (x0, y0), (x1, y1), BOX, thickness + 1)
        if points is not None:
            for (x, y), label in zip(
                np.asarray(points).reshape(-1, 2), np.asarray(labels).reshape(-1)
            ):
                centre = (int(round(x)), int(round(y)))
                cv2.circle(panel, centre, radius + thickness, (255, 255, 255), -1)
                cv2.circle(panel, centre, radius, FOREGROUND if label == 1 else BACKGROUND, -1)
        if captions is not None:
            origin = (10, int(30 * max(scale, 0.5)))
            for colour, width in (((0, 0, 0), thickness + 2), ((255, 255, 255), thickness)):
                # white text on a black outline: readable on any photo
                cv2.putText(
                    panel, captions[i], origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8 * max(scale, 0.5),
                    colour, width, cv2.LINE_AA,
                )
        panels.append(panel)
    return np.concatenate(panels, axis=1) if panels else image.copy()


def encode_png(image: np.ndarray) -> bytes:
    """HxW (grey) or HxWx3 RGB uint8 -> PNG bytes."""
    import cv2

    array = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    return data.tobytes()


def overlay_masks(
    image: np.ndarray, masks, alpha: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Every mask on one picture, one colour per mask, outlined (the automatic generator's view).

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      masks (Iterable[np.ndarray]): HxW bool masks, drawn in the given order (pass large masks
        first so small ones stay visible); consumed one at a time, so a generator keeps memory flat.
      alpha (float): tint strength; seed (int): colour choice.
    Returns:
      (np.ndarray): HxWx3 uint8 RGB.
    """
    import cv2

    rng = np.random.default_rng(seed)
    canvas = image.astype(np.float32)
    outlines = []
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        colour = rng.integers(40, 256, size=3).astype(np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        outlines.append((contours, tuple(int(c) for c in colour)))
    out = np.ascontiguousarray(canvas.round().clip(0, 255).astype(np.uint8))
    thickness = max(1, int(round(max(image.shape[:2]) / 1000.0)))
    for contours, colour in outlines:
        cv2.drawContours(out, contours, -1, colour, thickness)
    return out
