"""Differential run: the engine's automatic generator against Meta's on random settings.

    python bench/parity_fuzz.py --meta-path /tmp/meta_sam                 # 20 trials, fixture model
    python bench/parity_fuzz.py --meta-path /tmp/meta_sam --trials 40 --seed 100 \
        --model /tmp/other/config.json /tmp/other/model.pth              # and another model
    python bench/parity_fuzz.py --meta-path /tmp/meta_sam --model /tmp/dec128/config.json \
        /tmp/dec128/model.pth --only-model --iou-thresholds 0 0.1 0.2  # its IoUs run lower

Each trial draws a real photo (demo/photos and ../shared/data/images), a size (long side 120-700
px) and every generator parameter Meta's code has (points per side and batch, both thresholds,
the stability offset, both NMS thresholds, crop layers, overlap and downscale, small-region
cleanup, output mode), runs Meta's `segment-anything` 1.0 and the engine on it in this process,
and compares the records field by field: count and order, bbox, area, crop_box, point_coords,
predicted_iou and stability_score to the last bit, and the segmentation. It prints one line a
trial (OK, or the first differences) and a summary. A trial is reproducible from its number
(`--seed N --trials 1`). Meta's generator runs through `bench/meta_standin.py`; it raises an
IndexError when no crop keeps a mask (its bug): such trials print the engine's count only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))
PARITY = SHARED / "fixtures" / "sam_parity"


IOU_THRESHOLDS = [0.0, 0.5, 0.7, 0.8, 0.86, 0.88, 0.92]


def draw(
    trial: int, photos: list[Path], models: list[str], iou_thresholds: list[float] = IOU_THRESHOLDS
) -> tuple[str, Path, int, dict]:
    """(model, photo, long side, generator parameters) of a trial, from its number (and the
    IoU thresholds drawn from) alone."""
    rng = random.Random(trial)
    model, photo, long_side = rng.choice(models), rng.choice(photos), rng.randint(120, 700)
    params = dict(
        points_per_side=rng.randint(2, 12),
        points_per_batch=rng.choice([1, 2, 3, 5, 7, 16, 33, 64]),
        pred_iou_thresh=rng.choice(iou_thresholds),
        stability_score_thresh=rng.choice([0.0, 0.5, 0.8, 0.9, 0.95, 0.97]),
        stability_score_offset=rng.choice([1.0, 1.0, 0.5, 2.0]),
        box_nms_thresh=rng.choice([0.5, 0.7, 0.9]),
        crop_n_layers=rng.choice([0, 0, 1, 1, 2]),
        crop_nms_thresh=rng.choice([0.5, 0.7]),
        crop_overlap_ratio=rng.choice([512 / 1500, 0.2, 0.45]),
        crop_n_points_downscale_factor=rng.choice([1, 2]),
        min_mask_region_area=rng.choice([0, 0, 20, 100]),
        output_mode=rng.choice(["binary_mask", "coco_rle", "uncompressed_rle"]),
    )
    # keep a trial to seconds: Meta's generator takes ~2 s an encoder pass (21 with 2 layers)
    params["points_per_side"] = min(params["points_per_side"], (12, 8, 4)[params["crop_n_layers"]])
    # at least one point on the last crop layer (both generators refuse fewer)
    fewest = params["crop_n_points_downscale_factor"] ** params["crop_n_layers"]
    params["points_per_side"] = max(params["points_per_side"], fewest)
    return model, photo, long_side, params


def differences(out: list[dict], ref: list[dict]) -> list[str]:
    """Where the engine's records differ from Meta's (empty: identical)."""
    import numpy as np

    found = [] if len(out) == len(ref) else [f"count {len(out)} vs {len(ref)}"]
    for i, (a, b) in enumerate(zip(out, ref)):
        for key in ("bbox", "area", "crop_box"):
            if [int(v) for v in np.ravel(a[key])] != [int(v) for v in np.ravel(b[key])]:
                found.append(f"#{i} {key} {a[key]} vs {b[key]}")
        if np.asarray(a["point_coords"], float).tolist() != np.asarray(b["point_coords"], float).tolist():
            found.append(f"#{i} point_coords {a['point_coords']} vs {b['point_coords']}")
        for key in ("predicted_iou", "stability_score"):
            x, y = float(a[key]), float(b[key])
            if x != y and not (x != x and y != y):  # NaN (0/0 stability) equals NaN here
                found.append(f"#{i} {key} {x!r} vs {y!r}")
        if not same_segmentation(a["segmentation"], b["segmentation"]):
            found.append(f"#{i} segmentation")
    return found


def same_segmentation(mine, theirs) -> bool:
    import numpy as np

    if isinstance(mine, np.ndarray):
        return np.array_equal(mine, theirs)
    counts = theirs["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode()
    if isinstance(counts, list):
        counts = [int(c) for c in counts]
        return [int(c) for c in mine["counts"]] == counts and list(mine["size"]) == list(theirs["size"])
    return mine["counts"] == counts and list(mine["size"]) == list(theirs["size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-path", required=True, help="folder holding segment_anything (pip --target)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="number of the first trial")
    parser.add_argument("--model", nargs=2, metavar=("CONFIG", "CHECKPOINT"),
                        help="also draw this model (config.json-style architecture and state dict)")
    parser.add_argument("--only-model", action="store_true", help="draw --model's model only")
    parser.add_argument("--iou-thresholds", nargs="+", type=float, default=IOU_THRESHOLDS,
                        help="pred_iou_thresh values to draw (a model whose predicted IoUs run "
                             "lower than SAM's needs lower ones to keep any mask)")
    args = parser.parse_args()
    if not (Path(args.meta_path) / "segment_anything").is_dir():
        sys.exit(f"segment_anything not found under {args.meta_path}: pip install --no-deps "
                 f"--target {args.meta_path} segment-anything==1.0")
    if args.only_model and not args.model:
        sys.exit("--only-model: give the model with --model CONFIG CHECKPOINT")
    if not PARITY.is_dir():
        sys.exit(f"{PARITY} is absent: the parity fixture's model is needed")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, args.meta_path)
    import numpy as np
    from PIL import Image

    from bench.meta_standin import build_meta_sam, install
    from engine.amg import SamAutomaticMaskGenerator as EngineGenerator
    from engine.image_io import load_image
    from engine.model import build_sam

    models = {"fixture": (str(PARITY / "config.json"), str(PARITY / "sam_small.pth"))}
    if args.model:
        models["other"] = tuple(args.model)
    if args.only_model:
        del models["fixture"]
    photos = sorted((ROOT / "demo" / "photos").glob("*.jpg"))
    photos += sorted((SHARED / "data" / "images").glob("*/*.jpg"))[:30]
    install()  # torchvision's four symbols, before Meta's package is imported
    from segment_anything import SamAutomaticMaskGenerator as MetaGenerator

    built: dict[str, tuple] = {}
    tally = {"identical": 0, "different": 0, "meta failed": 0}
    for trial in range(args.seed, args.seed + args.trials):
        name, photo, long_side, params = draw(trial, photos, sorted(models), args.iou_thresholds)
        if name not in built:
            built[name] = (build_meta_sam(*models[name]), build_sam(*models[name]))
        meta_sam, engine_sam = built[name]
        rgb = load_image(photo)
        scale = long_side / max(rgb.shape[:2])
        size = (max(8, round(rgb.shape[1] * scale)), max(8, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        tag = f"trial {trial}: {name} {photo.name} {size[0]}x{size[1]} {json.dumps(params)}"
        start = time.perf_counter()
        out = EngineGenerator(engine_sam, **params).generate(rgb)
        engine_s = time.perf_counter() - start
        start = time.perf_counter()
        try:
            ref = MetaGenerator(meta_sam, **params).generate(rgb)
        except Exception as exc:  # Meta 1.0's empty-crops IndexError
            tally["meta failed"] += 1
            print(f"{tag}\n  Meta failed ({type(exc).__name__}: {exc}); engine {len(out)} masks",
                  flush=True)
            continue
        meta_s = time.perf_counter() - start
        found = differences(out, ref)
        tally["different" if found else "identical"] += 1
        verdict = "OK" if not found else "DIFFERENT: " + "; ".join(found[:6])
        print(f"{tag}\n  {verdict} ({len(ref)} masks; Meta {meta_s:.1f} s, engine {engine_s:.1f} s)",
              flush=True)
    print(json.dumps(tally))


if __name__ == "__main__":
    main()
