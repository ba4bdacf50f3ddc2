"""The privacy stage: detect faces and plates, blur them, and report what was blurred.

`PrivacyFilter` works on one RGB image (the `blur` CLI and benchmarks use it). `PrivacyStage` is
the shard runner's per-image function: a plain callable, so the non-Ray runner
(`sharding.run_stage(store, PRIVACY_STAGE, 0, PrivacyStage(cfg))`) and a Ray actor pool (detectors
loaded once per actor in `__init__`) run the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.privacy.blur import blur_regions
from engine.privacy.config import PrivacyConfig
from engine.privacy.detectors import Detection, build_detectors


@dataclass
class BlurResult:
    """image: HxWx3 uint8 blurred. mask: HxW bool, the pixels blurred. detections: XYXY boxes."""

    image: np.ndarray
    mask: np.ndarray
    detections: list[Detection] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "faces": sum(d.kind == "face" for d in self.detections),
            "plates": sum(d.kind == "plate" for d in self.detections),
        }


class PrivacyFilter:
    """Detectors loaded once; `blur(rgb)` per image."""

    def __init__(self, cfg: PrivacyConfig | None = None) -> None:
        self.cfg = cfg or PrivacyConfig()
        self.detectors = build_detectors(self.cfg)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Arguments: rgb (np.ndarray): HxWx3 uint8. Returns: faces then plates, XYXY pixels."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")
        return [d for detector in self.detectors for d in detector.detect(rgb)]

    def blur(self, rgb: np.ndarray) -> BlurResult:
        detections = self.detect(rgb)
        image, mask = blur_regions(
            rgb,
            detections,
            margin=self.cfg.margin,
            mode=self.cfg.blur,
            strength=self.cfg.blur_strength,
        )
        return BlurResult(image, mask, detections)

    def run_metadata(self) -> dict[str, Any]:
        """Detectors (weights, checksums, licences) and settings, for run records."""
        return {
            "detectors": {d.kind: d.info for d in self.detectors},
            "config": asdict(self.cfg),
        }

    def encode(self, image: np.ndarray) -> bytes:
        """HxWx3 uint8 RGB -> JPEG bytes at the configured quality."""
        import cv2

        ok, buf = cv2.imencode(
            ".jpg",
            cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, int(self.cfg.jpeg_quality)],
        )
        if not ok:
            raise ValueError("JPEG encoding of the blurred image failed")
        return buf.tobytes()


class PrivacyStage:
    """Shard-runner function: (ImageRow, HxWx3 uint8 RGB in the store frame) -> StageResult with
    the blurred JPEG and meta {faces, plates, detections: [{kind, box XYXY, score}], models}."""

    def __init__(self, cfg: PrivacyConfig | None = None) -> None:
        self.filter = PrivacyFilter(cfg)
        self._models = {
            d.kind: f"{d.info['weights']} ({d.info['licence']})" for d in self.filter.detectors
        }

    def __call__(self, row: Any, rgb: np.ndarray):
        from sharding.runner import StageResult

        result = self.filter.blur(rgb)
        meta = {
            **result.counts(),
            "detections": [d.to_json() for d in result.detections],
            "models": self._models,
        }
        return StageResult(image=self.filter.encode(result.image), meta=meta)

    def run_metadata(self) -> dict[str, Any]:
        return self.filter.run_metadata()


def run_privacy(store: Any, cfg: PrivacyConfig | None = None, round_: int = 0, shards=None):
    """Run the privacy stage over a store with the non-Ray runner; the detectors' weights,
    checksums and licences are written to `STORE/runs/privacy/<time>-detectors.json`.

    Returns:
      (RunReport): the runner's report.
    """
    from sharding.runner import run_stage
    from sharding.store import PRIVACY_STAGE, utc_now

    stage = PrivacyStage(cfg)
    report = run_stage(store, PRIVACY_STAGE, round_, stage, shards=shards)
    store.write_run_record(
        PRIVACY_STAGE,
        {"finished_at": utc_now(), "round": round_, **stage.run_metadata()},
        store.root / "runs" / PRIVACY_STAGE / f"{utc_now().replace(':', '')}-detectors.json",
    )
    return report
