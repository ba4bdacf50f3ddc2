"""Synthetic training scenes: shapes filled with colours, textures and real photo patches, pasted
over a photo or texture background, with exact instance masks.

They let the bundled model be trained without any annotated data: every object's visible mask is
known by construction (later objects occlude earlier ones), objects may carry a part (a whole and
its part are both masks, as in SA-1B), and fills taken from real photos keep the network from
learning "a mask is a flat colour". Scenes are a pure function of (config, seed).

Photo patches come from `engine/training/patches/` (CC0 / public-domain images from the
scikit-image wheel, see LICENSES.md there) and `demo/photos/` when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engine.image_io import load_image

PATCH_DIR = Path(__file__).resolve().parent / "patches"
DEMO_PHOTOS = Path(__file__).resolve().parents[2] / "demo" / "photos"


@dataclass(frozen=True)
class SceneConfig:
    """Attributes:
    min_side, max_side (int): the scene's longest side is drawn from this range (pixels).
    min_objects, max_objects (int): objects per scene.
    min_mask_area (float): visible masks smaller than this share of the image are dropped.
    part_probability (float): chance that an object carries a part (also a mask).
    """

    min_side: int = 400
    max_side: int = 640
    min_objects: int = 3
    max_objects: int = 9
    min_mask_area: float = 0.002
    part_probability: float = 0.3


def photo_library(extra: list[Path] | None = None) -> list[np.ndarray]:
    """The RGB photos fills are cut from: the bundled patches, demo/photos, and `extra` files."""
    paths = sorted(PATCH_DIR.glob("*.jpg")) + sorted(DEMO_PHOTOS.glob("*.jpg")) + list(extra or [])
    if not paths:
        raise FileNotFoundError(f"no photo patches found in {PATCH_DIR} or {DEMO_PHOTOS}")
    return [load_image(p) for p in paths]


def make_scene(
    seed: int, config: SceneConfig, photos: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One scene.

    Arguments:
      seed (int): the scene is a pure function of the seed (and config, photos).
      config (SceneConfig): sizes and counts.
      photos (list[np.ndarray]): HxWx3 uint8 sources of photo fills (see `photo_library`).
    Returns:
      (np.ndarray): HxWx3 uint8 RGB image.
      (list[np.ndarray]): HxW bool visible masks (objects and parts), at least one.
    """
    rng = np.random.default_rng(seed)
    long_side = int(rng.integers(config.min_side, config.max_side + 1))
    aspect = rng.uniform(0.6, 1.0)
    if rng.random() < 0.5:
        height, width = long_side, max(64, int(long_side * aspect))
    else:
        height, width = max(64, int(long_side * aspect)), long_side
    image = _fill(rng, height, width, photos, background=True)
    shapes: list[np.ndarray] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        shape = _shape(rng, height, width)
        if shape.sum() < 16:
            continue
        _paint(image, shape, _fill(rng, height, width, photos), rng)
        shapes.append(shape)
        if rng.random() < config.part_probability:
            part = _part(rng, shape)
            if part is not None:
                _paint(image, part, _fill(rng, height, width, photos), rng)
                shapes.append(part)
    image = _finish(rng, image)
    masks = _visible(shapes, height * width * config.min_mask_area)
    if not masks:  # a scene always has a mask: fall back to a plain rectangle
        box = np.zeros((height, width), bool)
        box[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
        masks = [box]
    return image, masks


def _visible(shapes: list[np.ndarray], min_area: float) -> list[np.ndarray]:
    """Visible part of each shape: what no later shape covers, except the shape's own parts."""
    masks = []
    covered = np.zeros_like(shapes[0]) if shapes else None
    for shape in reversed(shapes):
        visible = shape & ~covered
        # A part lies inside its object: the object's mask keeps it (whole contains part).
        covered |= shape
        if visible.sum() >= min_area:
            masks.append(visible)
    # Parts were subtracted from their wholes above; add them back where a part sits inside.
    return _wholes_with_parts(masks[::-1])


def _wholes_with_parts(masks: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, mask in enumerate(masks):
        whole = mask.copy()
        for later in masks[i + 1 :]:
            touching = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            inside = (later & touching).sum() > 0 and _is_hole_filler(mask, later)
            if inside:
                whole |= later
        out.append(whole)
    return out


def _is_hole_filler(mask: np.ndarray, other: np.ndarray) -> bool:
    """True when `other` fills a hole of `mask` (it is a part placed inside it)."""
    filled = mask.astype(np.uint8).copy()
    contours, _ = cv2.findContours(filled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return (other & filled.astype(bool)).sum() >= 0.9 * other.sum()


def _shape(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One object mask: ellipse, rotated rectangle, star polygon, noise blob or stick figure."""
    canvas = np.zeros((height, width), np.uint8)
    side = min(height, width)
    size = side * rng.uniform(0.06, 0.55)
    cx, cy = rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height
    kind = rng.choice(["ellipse", "rect", "polygon", "blob", "figure"], p=[0.2, 0.15, 0.25, 0.2, 0.2])
    if kind == "ellipse":
        axes = (int(size / 2), int(size / 2 * rng.uniform(0.3, 1.0)))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    elif kind == "rect":
        rect = ((cx, cy), (size, size * rng.uniform(0.2, 1.0)), rng.uniform(0, 180))
        cv2.fillPoly(canvas, [cv2.boxPoints(rect).astype(np.int32)], 1)
    elif kind == "polygon":
        count = int(rng.integers(5, 15))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = size / 2 * rng.uniform(0.35, 1.0, count)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [points.astype(np.int32)], 1)
    elif kind == "blob":
        grid = int(rng.integers(3, 7))
        noise = cv2.resize(rng.random((grid, grid)).astype(np.float32), (int(size), int(size)))
        noise *= _radial(int(size))
        blob = (noise > rng.uniform(0.25, 0.45)).astype(np.uint8)
        _place(canvas, blob, cx, cy)
    else:  # an articulated "figure": a head, a torso and limbs as thick segments
        thick = max(2, int(size * rng.uniform(0.07, 0.16)))
        top = np.array([cx, cy - size / 2])
        hip = top + [rng.normal(0, size * 0.08), size * 0.55]
        cv2.circle(canvas, tuple(int(v) for v in top), max(2, int(thick * 1.1)), 1, -1)
        cv2.line(canvas, _pt(top), _pt(hip), 1, int(thick * 1.6))
        for origin in (top + [0, thick * 1.5], hip, hip, top + [0, thick * 1.5]):
            joint = origin + rng.normal(0, size * 0.22, 2)
            end = joint + rng.normal(0, size * 0.2, 2)
            cv2.line(canvas, _pt(origin), _pt(joint), 1, thick)
            cv2.line(canvas, _pt(joint), _pt(end), 1, max(2, int(thick * 0.8)))
    return canvas.astype(bool)


def _pt(point: np.ndarray) -> tuple[int, int]:
    return int(point[0]), int(point[1])


def _radial(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(x - size / 2, y - size / 2) / (size / 2)
    return np.clip(1.2 - r, 0, 1)


def _place(canvas: np.ndarray, patch: np.ndarray, cx: float, cy: float) -> None:
    h, w = patch.shape
    y0, x0 = int(cy - h / 2), int(cx - w / 2)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(canvas.shape[0], y0 + h), min(canvas.shape[1], x0 + w)
    if ye > ys and xe > xs:
        canvas[ys:ye, xs:xe] |= patch[ys - y0 : ye - y0, xs - x0 : xe - x0]


def _part(rng: np.random.Generator, shape: np.ndarray) -> np.ndarray | None:
    """A smaller shape inside `shape` (eroded so it stays inside): an object's part."""
    ys, xs = np.nonzero(shape)
    span = min(ys.max() - ys.min(), xs.max() - xs.min())
    if span < 24:
        return None
    inner = cv2.erode(shape.astype(np.uint8), np.ones((5, 5), np.uint8), iterations=2)
    i = int(rng.integers(len(ys)))
    canvas = np.zeros_like(inner)
    radius = max(3, int(span * rng.uniform(0.12, 0.3)))
    if rng.random() < 0.5:
        cv2.circle(canvas, (int(xs[i]), int(ys[i])), radius, 1, -1)
    else:
        rect = ((float(xs[i]), float(ys[i])), (radius * 2.0, radius * rng.uniform(0.6, 2.0)), rng.uniform(0, 180))
        cv2.fillPoly(canvas, [cv2.boxPoints(rect).astype(np.int32)], 1)
    part = (canvas & inner).astype(bool)
    return part if part.sum() >= 0.3 * canvas.sum() and part.sum() > 32 else None


def _fill(
    rng: np.random.Generator, height: int, width: int, photos: list[np.ndarray], background: bool = False
) -> np.ndarray:
    """An HxWx3 float32 fill: flat colour, gradient, stripes, noise texture or a photo patch."""
    kinds = ["flat", "gradient", "stripes", "noise", "photo"]
    weights = [0.05, 0.1, 0.1, 0.15, 0.6] if background else [0.2, 0.15, 0.15, 0.15, 0.35]
    kind = rng.choice(kinds, p=weights)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "photo":
        return _photo_patch(rng, height, width, photos)
    if kind == "flat":
        t = np.zeros((height, width), np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(1e-6, np.ptp(t))
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 40)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    else:
        grid = int(rng.integers(4, 40))
        t = cv2.resize(rng.random((grid, grid)).astype(np.float32), (width, height))
    fill = c1 + (c2 - c1) * t[..., None]
    return fill + rng.normal(0, rng.uniform(0, 8), fill.shape).astype(np.float32)


def _photo_patch(rng: np.random.Generator, height: int, width: int, photos: list[np.ndarray]) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    scale = rng.uniform(0.5, 2.0) * max(height / photo.shape[0], width / photo.shape[1])
    resized = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    ph, pw = resized.shape[:2]
    if ph < height or pw < width:
        resized = cv2.resize(resized, (max(pw, width), max(ph, height)))
        ph, pw = resized.shape[:2]
    y0, x0 = int(rng.integers(0, ph - height + 1)), int(rng.integers(0, pw - width + 1))
    patch = resized[y0 : y0 + height, x0 : x0 + width].astype(np.float32)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    gain, shift = rng.uniform(0.7, 1.3, 3), rng.uniform(-30, 30, 3)
    return patch * gain + shift


def _paint(image: np.ndarray, mask: np.ndarray, fill: np.ndarray, rng: np.random.Generator) -> None:
    """Composite `fill` into `image` where `mask`, with a 1-px soft edge and optional shading."""
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.7)[..., None]
    if rng.random() < 0.4:  # shading: darker towards one side, as under directional light
        ys, xs = np.nonzero(mask)
        angle = rng.uniform(0, 2 * np.pi)
        proj = (np.arange(image.shape[1])[None] * np.cos(angle)) + (np.arange(image.shape[0])[:, None] * np.sin(angle))
        lo, hi = proj[ys, xs].min(), proj[ys, xs].max()
        shade = 1.0 - rng.uniform(0.1, 0.5) * np.clip((proj - lo) / max(1.0, hi - lo), 0, 1)
        fill = fill * shade[..., None]
    image *= 1 - alpha
    image += alpha * fill


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera-like finish: a slight blur (photos arrive upsampled), sensor noise, clipping."""
    if rng.random() < 0.6:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.2))
    image = image + rng.normal(0, rng.uniform(0, 5), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
