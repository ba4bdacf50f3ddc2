"""The data-engine loop end to end on real photos: gear 1 (simulated annotator) with the current
model, retrain on what gear 1 collected, gear 1 again with the new round.

On `../shared/data` persons (COCO JSON): the first half of the images (sorted by id) are gear 1's
images, the second half is held out. Steps, all through the engine's real code paths:
  1. ingest the gear-1 images into a fresh store (`sharding.ingest`);
  2. gear 1, round 0: for every shard, the simulated annotator clicks each reference person with
     the bundled default model and the accepted masks are written as stage `assisted` round 0
     (`sharding.process_shard`, SA-1B records);
  3. `sa-engine train STORE --from assisted --round 0` trains round 1 on those collected masks;
  4. gear 1 on the held-out half with round 0 and with round 1 (same annotator), and
     `sa-engine evaluate` (the gate) on the held-out half.
It prints a table of clicks per mask and IoU per round. Usage:

    python bench/bench_engine_loop.py [--images 60] [--steps 300] [--threads 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))
PERSONS = SHARED / "data" / "annotations" / "coco_persons_keypoints.json"
IMAGES = SHARED / "data" / "images"


def gear1(predictor, annotator, image: np.ndarray, references: list[np.ndarray]):
    """Annotate every reference on one image; returns (MaskRecords, per-mask stats)."""
    from engine import rle
    from engine.records import MaskRecord

    predictor.set_image(image)
    records, stats = [], []
    for index, trace in annotator.annotate_image(references):
        mask = trace.mask
        stats.append({"clicks": trace.n_clicks, "iou": trace.final_iou, "first": trace.ious[0],
                      "reached": trace.reached_target})
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1)]
        records.append(
            MaskRecord(
                id=index,
                segmentation=rle.encode(mask)[0],
                bbox=bbox,
                area=int(mask.sum()),
                predicted_iou=float(trace.predicted_iou),
                stability_score=1.0,
                crop_box=[0.0, 0.0, float(mask.shape[1]), float(mask.shape[0])],
                point_coords=[[c.x, c.y] for c in trace.clicks],
            )
        )
    return records, stats


def summarise(stats: list[dict]) -> dict[str, float]:
    return {
        "masks": len(stats),
        "clicks_per_mask": float(np.mean([s["clicks"] for s in stats])),
        "final_iou": float(np.mean([s["iou"] for s in stats])),
        "iou_1click": float(np.mean([s["first"] for s in stats])),
        "reached_0.9": float(np.mean([s["reached"] for s in stats])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="persons images used (both halves)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the retrain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    args = parser.parse_args()
    if not PERSONS.is_file():
        print(f"skip: {PERSONS} is absent (set SA_ENGINE_SHARED)")
        return

    import torch
    from pycocotools.coco import COCO

    from engine.annotator import AnnotatorConfig, SimulatedAnnotator
    from engine.image_io import load_image
    from engine.predictor import SamPredictor
    from engine.training.registry import ModelRegistry
    from sharding import Store, ingest, process_shard
    from sharding.runner import StageResult

    torch.set_num_threads(args.threads)
    coco = COCO(str(PERSONS))
    ids = [i for i in sorted(coco.getImgIds()) if coco.getAnnIds(imgIds=[i], iscrowd=False)]
    ids = ids[: args.images]
    half = len(ids) // 2
    gear_ids, held_ids = ids[:half], ids[half:]

    def references(image_id: int) -> list[np.ndarray]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
        return [coco.annToMask(a).astype(bool) for a in anns]

    work = args.work or Path(tempfile.mkdtemp(prefix="engine-loop-"))
    links = work / "gear1-images"
    links.mkdir(parents=True, exist_ok=True)
    by_name = {}
    for image_id in gear_ids:
        name = coco.loadImgs([image_id])[0]["file_name"]
        target = links / Path(name).name
        if not target.exists():
            target.symlink_to(IMAGES / name)
        by_name[target.name] = image_id
    store_root = work / "store"
    store = Store(store_root) if (store_root / "store.json").is_file() else Store.create(store_root)
    ingest(str(links), store)
    annotate_cfg = AnnotatorConfig(max_clicks=args.max_clicks, time_limit_s=1e9)
    registry = ModelRegistry(store_root)
    timings = {}

    # 2. gear 1 with round 0 on the gear-1 half, written into the store as stage `assisted`.
    start = time.perf_counter()
    predictor = SamPredictor(registry.load(0))
    annotator = SimulatedAnnotator(predictor, annotate_cfg)
    gear_stats: list[dict] = []

    def process(row, rgb):
        refs = references(by_name[Path(row.source).name])
        records, stats = gear1(predictor, annotator, rgb, refs)
        gear_stats.extend(stats)
        return StageResult(masks=records)

    for shard in store.shards():
        process_shard(store, "assisted", 0, shard, process)
    timings["gear1_round0_s"] = time.perf_counter() - start

    # 3. retrain on the collected masks with the real CLI.
    start = time.perf_counter()
    if 1 not in registry.rounds():
        command = [
            str(ROOT / ".venv" / "bin" / "sa-engine"), "train", str(store_root), "--from",
            "assisted", "--round", "0", "--held-out-share", "0", "--threads", str(args.threads),
            "--set", f"train.steps={args.steps}", "--set", "train.rounds=3",
            "--set", "train.rounds_without_point=1", "--set", "train.masks_per_image=4",
            "--set", "train.warmup_steps=20", "--set", "train.lr=0.0002",
            "--set", "train.image_sizes=[512]",
        ]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    timings["train_s"] = time.perf_counter() - start

    # 4. gear 1 on the held-out half with both rounds.
    held = {}
    for round_ in (0, 1):
        start = time.perf_counter()
        predictor = SamPredictor(registry.load(round_))
        annotator = SimulatedAnnotator(predictor, annotate_cfg)
        stats: list[dict] = []
        for image_id in held_ids:
            image = load_image(IMAGES / coco.loadImgs([image_id])[0]["file_name"])
            stats.extend(gear1(predictor, annotator, image, references(image_id))[1])
        held[round_] = summarise(stats)
        timings[f"held_out_round{round_}_s"] = time.perf_counter() - start

    collected = summarise(gear_stats)
    print(f"\ndata-engine loop on {PERSONS.name}: {len(gear_ids)} gear-1 images, "
          f"{len(held_ids)} held out; retrain {args.steps} steps")
    print(f"{'run':<34} {'masks':>5} {'clicks/mask':>11} {'IoU 1 click':>11} {'final IoU':>9} {'reached 0.9':>11}")
    rows = [("gear 1, round 0, gear-1 half", collected)] + [
        (f"gear 1, round {r}, held-out half", held[r]) for r in (0, 1)
    ]
    for name, s in rows:
        print(f"{name:<34} {s['masks']:>5} {s['clicks_per_mask']:>11.2f} {s['iou_1click']:>11.3f} "
              f"{s['final_iou']:>9.3f} {s['reached_0.9']:>11.1%}")
    print(json.dumps({"collected": collected, "held_out": held, "seconds": timings}, indent=1))


if __name__ == "__main__":
    main()
