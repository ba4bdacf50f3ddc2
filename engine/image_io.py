"""The engine's one image loader: every stage decodes images here, so every stage agrees on pixels.

Photos arrive in every shape a camera or a scraper produces (EXIF-rotated, CMYK, 16-bit, palette,
alpha, grey, truncated, not an image at all). `load_image` either returns RGB uint8 HxWx3 with the
EXIF orientation applied, or raises `ImageLoadError` whose message names the input, the reason and
the fix, so callers can quarantine the input and go on.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# what a folder's listing takes as an image (`ingest`, `amg`): the formats Pillow reads that
# cameras and scrapers write (.jfif and .jpe are JPEGs under other names)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm")
DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb guard (SA-1B photos are ~3300x4900 = 16 MP)
DEFAULT_MIN_SIDE = 1
# SAM's smallest useful input: a store quarantines smaller images as too_small (its default
# min_side) and `amg` skips them with that reason
SAM_MIN_SIDE = 32


class ImageLoadError(ValueError):
    """An input that cannot become an RGB image. `reason` is a short machine-readable tag."""

    def __init__(self, source: str, reason: str, detail: str, fix: str) -> None:
        self.source = source
        self.reason = reason
        self.detail = detail
        self.fix = fix
        super().__init__(f"{source}: {detail} ({fix})")


@dataclass(frozen=True)
class ImageInfo:
    """What was done to an input to make it RGB uint8; recorded so normalisation is never silent."""

    original_mode: str
    exif_rotated: bool
    width: int
    height: int
    frames: int = 1  # an animated GIF, WebP or multi-page TIFF: only the first frame is read


def load_image(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Decode an image file (path or bytes) to RGB uint8 HxWx3, EXIF orientation applied.

    Arguments:
      source (str | Path | bytes): a file path or the encoded bytes.
      name (str | None): how to name the input in errors (defaults to the path).
      max_pixels (int): refuse images larger than this (decompression bombs).
      min_side (int): refuse images whose shorter side is below this.
    Returns:
      (np.ndarray): HxWx3 uint8, RGB.
    Raises:
      ImageLoadError: naming the input, the reason and the fix.
    """
    return load_image_with_info(source, name=name, max_pixels=max_pixels, min_side=min_side)[0]


def load_image_with_info(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> tuple[np.ndarray, ImageInfo]:
    """`load_image`, also returning how the input was normalised."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = _read_bytes(source, label)
    if len(data) == 0:
        raise ImageLoadError(label, "empty", "the file is empty (0 bytes)", "re-copy the file from its source")
    try:
        with _no_pil_bomb_limit():  # the size check below names the input; PIL's would raise at open
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageLoadError(
            label, "not_an_image", "not a recognised image format",
            "convert it to JPEG or PNG, or remove it from the source",
        ) from None
    except Exception as exc:  # format plugins raise many types on malformed headers
        raise ImageLoadError(
            label, "corrupt", f"header cannot be read ({type(exc).__name__}: {exc})",
            "re-copy or re-encode the file",
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            label, "too_large", f"{width}x{height} = {width * height / 1e6:.0f} MP exceeds the "
            f"{max_pixels / 1e6:.0f} MP limit (decompression-bomb guard)",
            "downscale the image (a store's limit is the one it was created with, "
            "`Store.create(max_pixels=...)` in Python)",
        )
    try:
        with _no_pil_bomb_limit():
            image.load()
        original_mode = image.mode
        exif_rotated = _orientation(image) not in (0, 1)
        rgb = _to_rgb(ImageOps.exif_transpose(image) if exif_rotated else image)
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageLoadError(
            label, "corrupt", f"cannot be decoded ({type(exc).__name__}: {exc})",
            "re-copy or re-encode the file",
        ) from None
    if min(rgb.shape[:2]) < min_side:
        raise ImageLoadError(
            label, "too_small", f"{rgb.shape[1]}x{rgb.shape[0]} is smaller than {min_side} px on a side",
            "drop it, or upscale it (a store's limit is the one it was created with, "
            "`Store.create(min_side=...)` in Python)",
        )
    frames = int(getattr(image, "n_frames", 1) or 1)
    info = ImageInfo(original_mode, exif_rotated, rgb.shape[1], rgb.shape[0], frames)
    return rgb, info


def _read_bytes(source: str | Path | bytes, label: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(label, "missing", "no such file", "check the path") from None
    except IsADirectoryError:
        raise ImageLoadError(label, "not_a_file", "is a directory", "pass an image file") from None
    except PermissionError:
        raise ImageLoadError(label, "unreadable", "permission denied", "make the file readable") from None


@contextlib.contextmanager
def _no_pil_bomb_limit() -> Iterator[None]:
    """PIL's own bomb guard warns or raises with no input name; `max_pixels` is checked instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF must not cost the photo
        return 1


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode to RGB uint8; 16/32-bit integer images are scaled, not clipped."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)
        top = 65535 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255
        grey = np.clip(values * 255 // max(top, 1), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode == "F":
        grey = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Composite on white: transparent regions of product shots and logos are meant as background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error to record, not grey pixels
