"""Privacy recall on the real photos of ../shared/data (faces: COCO keypoints and COCO-WholeBody
boxes; plates: openalpr EU photos), measured on the blurred pixels the stage writes.

- faces_from_coco_keypoints: a face is covered when every labelled nose and eye keypoint lies in
  the blurred area; recall is reported for faces >= 16 px wide (target >= 0.95) and for all.
- faces_coco_wholebody: a face box is covered when its centre and >= 80% of its pixels are blurred.
- plates_eu: a plate is covered when >= 90% of its box is blurred (target >= 0.9).
- unmatched detections per image: detections that touch no labelled box. The face labels are not
  exhaustive (a face without keypoints has no box), so for faces this is an upper bound on false
  detections; each plate photo labels one plate, so a second real plate also counts here.

Usage: python bench/bench_privacy.py [--data ../shared/data] [--limit N] [--set privacy.k=v ...]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli.config import apply_overrides, load_config, section  # noqa: E402
from engine.image_io import load_image  # noqa: E402
from engine.privacy import PrivacyConfig, PrivacyFilter  # noqa: E402


def _iou_any(box, gts) -> bool:
    """Does `box` (XYXY) overlap any ground-truth XYWH box at all (IoU > 0.05 or contains its
    centre)?"""
    x0, y0, x1, y1 = box
    for gx, gy, gw, gh in gts:
        ix = max(0.0, min(x1, gx + gw) - max(x0, gx))
        iy = max(0.0, min(y1, gy + gh) - max(y0, gy))
        inter = ix * iy
        union = (x1 - x0) * (y1 - y0) + gw * gh - inter
        cx, cy = gx + gw / 2, gy + gh / 2
        if (union > 0 and inter / union > 0.05) or (x0 <= cx <= x1 and y0 <= cy <= y1):
            return True
    return False


def _box_fraction(mask: np.ndarray, bbox) -> float:
    x, y, w, h = bbox
    x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
    x1, y1 = min(mask.shape[1], int(np.ceil(x + w))), min(mask.shape[0], int(np.ceil(y + h)))
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float(mask[y0:y1, x0:x1].mean())


def _inside(mask: np.ndarray, x: float, y: float) -> bool:
    xi, yi = int(np.clip(np.floor(x), 0, mask.shape[1] - 1)), int(
        np.clip(np.floor(y), 0, mask.shape[0] - 1)
    )
    return bool(mask[yi, xi])


def run_dataset(privacy: PrivacyFilter, data: Path, name: str, kind: str, limit: int | None):
    from pycocotools.coco import COCO

    coco = COCO(str(data / "annotations" / f"{name}.json"))
    image_ids = sorted(coco.getImgIds())[:limit] if limit else sorted(coco.getImgIds())
    rows, unmatched, other_kind, seconds = [], 0, 0, []
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        rgb = load_image(data / "images" / info["file_name"])
        t0 = time.perf_counter()
        result = privacy.blur(rgb)
        seconds.append(time.perf_counter() - t0)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        gts = [a["bbox"] for a in anns]
        for det in result.detections:
            if det.kind != kind:
                other_kind += 1
            elif not _iou_any(det.box, gts):
                unmatched += 1
        for a in anns:
            width = a["bbox"][2]
            if "face_keypoints" in a:
                kp = np.asarray(a["face_keypoints"], float).reshape(5, 3)[:3]  # nose, eyes
                labelled = kp[kp[:, 2] > 0]
                if len(labelled) == 0:
                    continue
                covered = all(_inside(result.mask, x, y) for x, y, _ in labelled)
            elif kind == "face":
                x, y, w, h = a["bbox"]
                covered = _inside(result.mask, x + w / 2, y + h / 2) and (
                    _box_fraction(result.mask, a["bbox"]) >= 0.8
                )
            else:
                covered = _box_fraction(result.mask, a["bbox"]) >= 0.9
            rows.append((width, covered))
    widths = np.array([w for w, _ in rows])
    hits = np.array([c for _, c in rows], bool)

    def recall(sel: np.ndarray) -> str:
        return f"{hits[sel].mean():.3f} ({int(hits[sel].sum())}/{int(sel.sum())})" if sel.any() else "n/a"

    out = {
        "dataset": name,
        "images": len(image_ids),
        "labels": len(rows),
        "recall_all": recall(np.ones(len(rows), bool)),
        "recall_ge16px": recall(widths >= 16),
        "recall_ge24px": recall(widths >= 24),
        "recall_lt16px": recall(widths < 16),
        f"unmatched_{kind}_detections_per_image": round(unmatched / max(1, len(image_ids)), 3),
        "other_kind_detections_per_image": round(other_kind / max(1, len(image_ids)), 3),
        "seconds_per_image": round(float(np.mean(seconds)), 2),
        "missed_widths": sorted(round(float(w), 1) for w, c in rows if not c),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--config", default="sa1b")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set")
    parser.add_argument("--only", action="append", default=None, help="dataset names to run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (args.data / "annotations").is_dir():
        print(f"{args.data} is absent: nothing to measure (pass --data)")
        return
    config = apply_overrides(load_config(args.config), args.overrides)
    cfg = section(config, "privacy", PrivacyConfig)
    t0 = time.perf_counter()
    privacy = PrivacyFilter(cfg)
    print(f"detectors loaded in {time.perf_counter() - t0:.1f} s; config: {cfg}")
    results = []
    for name, kind in (("faces_from_coco_keypoints", "face"), ("faces_coco_wholebody", "face"),
                       ("plates_eu", "plate")):  # fmt: skip
        if args.only and name not in args.only:
            continue
        result = run_dataset(privacy, args.data, name, kind, args.limit)
        results.append(result)
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps({"config": str(cfg), "results": results}, indent=1))


if __name__ == "__main__":
    main()
