"""`PrivacyConfig`: the `privacy:` block of `configs/*.yaml` (every `blur` flag maps to a key)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.checks import invalid


@dataclass
class PrivacyConfig:
    """What to detect, how hard to look, and how to blur.

    face_backend / plate_backend: keys of `FACE_BACKENDS` / `PLATE_BACKENDS` ("none" turns a kind
      off; a release should never do that).
    face_score / plate_score: minimum detector score kept (0..1).
    face_scales: detection passes, as factors of the native resolution; 2.0 upscales so that
      faces of 8-16 px reach the detector's smallest anchor (16 px). Passes whose scaled long side
      exceeds `max_scaled_side` are skipped (large photos already have large faces in pixels).
    upscaled_max_face: detections of upscaled passes (factor > 1) are kept only if at most this
      wide in original pixels: upscaling is for small faces, and large upscaled regions (animal
      heads, textures) are where its false detections come from.
    face_max_side: one extra pass over the whole photo resized to this long side (if larger), so
      faces bigger than the largest anchor (512 px) are still found in large photos.
    tile_size / tile_overlap: passes larger than `tile_size` pixels on a side run in overlapping
      tiles (bounded memory; the overlap must exceed the largest face expected in a tile).
    plate_scales: plate passes (the ONNX model sees 640x640 letterboxed inputs; 1.0 = whole image,
      larger values tile the image so that small plates keep their pixels).
    margin: each box is enlarged by this factor about its centre before blurring (deface: 1.3).
    blur: "pixelate" (average down to a coarse grid, which discards the detail for good, then a
      Gaussian so no block edge survives) or "gaussian" (Gaussian only).
    blur_strength: Gaussian sigma as a fraction of the region's shorter side.
    jpeg_quality: quality of the written blurred JPEGs.
    cache_dir: where converted detector weights are cached (with checksums).
    device: "cpu", "cuda" or "auto".
    """

    face_backend: str = "retinaface"
    plate_backend: str = "platedet"
    face_score: float = 0.3
    plate_score: float = 0.35
    face_scales: list[float] = field(default_factory=lambda: [1.0, 2.0])
    upscaled_max_face: float = 40.0
    face_max_side: int = 1280
    max_scaled_side: int = 2048
    tile_size: int = 1280
    tile_overlap: int = 256
    plate_scales: list[float] = field(default_factory=lambda: [1.0])
    margin: float = 1.3
    blur: str = "pixelate"
    blur_strength: float = 0.2
    jpeg_quality: int = 92
    cache_dir: str = "~/.cache/sa-engine"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("face_score", "plate_score"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise invalid(f"privacy.{name}", getattr(self, name), "a score between 0 and 1")
        if not self.face_scales or any(float(s) <= 0 for s in self.face_scales):
            raise invalid("privacy.face_scales", self.face_scales, "positive factors, e.g. [1, 2]")
        if not self.plate_scales or any(float(s) < 1 for s in self.plate_scales):
            raise invalid("privacy.plate_scales", self.plate_scales, "factors >= 1, e.g. [1]")
        if float(self.margin) < 1.0:
            raise invalid("privacy.margin", self.margin, "a factor >= 1.0 (1.3 like deface)")
        if self.blur not in ("gaussian", "pixelate"):
            raise invalid("privacy.blur", self.blur, "gaussian or pixelate")
        if not 0.05 <= float(self.blur_strength) <= 1.0:
            raise invalid("privacy.blur_strength", self.blur_strength, "0.05 .. 1 (0.2 default)")
        if self.tile_size < 256:
            raise invalid("privacy.tile_size", self.tile_size, "a side >= 256 pixels")
        if not 0 <= self.tile_overlap < self.tile_size // 2:
            raise invalid(
                "privacy.tile_overlap", self.tile_overlap,
                f"0 <= tile_overlap < tile_size / 2 ({self.tile_size // 2})",
            )  # fmt: skip
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise invalid("privacy.jpeg_quality", self.jpeg_quality, "1 .. 100")
        if self.device not in ("cpu", "cuda", "auto"):
            raise invalid("privacy.device", self.device, "cpu, cuda or auto")
