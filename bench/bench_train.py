"""Retraining: seconds per optimiser step and masks per second of the paper's recipe, on a CPU or
a GPU, in one process (`engine.training.train`, the function every Ray Train worker runs).

The recipe is the `train:` block of configs/sa1b.yaml (11 interactive rounds per mask, 8 masks
per step, focal:dice 20:1 + IoU MSE, AdamW); the data are the real persons of ../shared/data
(COCO JSON, the training split). The rate is read between the first and the last progress line,
so the first steps (allocator and kernel warm-up) are left out; the cache line is the one-off
encoding of every image (frozen parts of the encoder).

  python bench/bench_train.py                                  # bundled default model, CPU
  python bench/bench_train.py --device cuda --model vit_b --steps 60 --set freeze_backbone=false
  python bench/bench_train.py --set masks_per_image=16 --set rounds=11   # any train: key
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))
PERSONS = SHARED / "data" / "annotations" / "coco_persons_keypoints.json"
IMAGES = SHARED / "data" / "images"


def main() -> None:
    from engine.cli.train import _train_config
    from engine.model import build_sam, resolve_device
    from engine.training.data import coco_items
    from engine.training.trainer import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--model", default="default", help="a registry name (default, vit_b, ...)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train: key of configs/sa1b.yaml (repeatable)")
    args = parser.parse_args()
    if not PERSONS.is_file():
        sys.exit(f"{PERSONS} is absent: set SA_ENGINE_SHARED or place shared/ beside the repo")
    if args.threads:
        torch.set_num_threads(args.threads)
    log_every = max(1, args.steps // 6)
    overrides = [f"train.{item}" for item in args.set]
    overrides += [f"train.steps={args.steps}", f"train.log_every={log_every}"]
    config, _, _ = _train_config("sa1b", overrides)
    device = resolve_device(args.device)
    sam = build_sam(args.model, device=device)
    items, info = coco_items(PERSONS, IMAGES, split="train")
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}; "
        f"model {args.model} ({sum(p.numel() for p in sam.parameters()) / 1e6:.1f} M parameters); "
        f"{info['images']} images, {info['masks']} masks; masks_per_image {config.masks_per_image}, "
        f"rounds {config.rounds}, freeze_backbone {config.freeze_backbone}, "
        f"freeze_image_encoder {config.freeze_image_encoder}",
        flush=True,
    )
    marks: list[tuple[int, float]] = []

    def log(line: str) -> None:
        print(line, flush=True)
        if line.startswith("step "):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append((int(line.split()[1].split("/")[0]), time.perf_counter()))

    result = train(sam, items, config, log=log)
    (first, t0), (last, t1) = marks[0], marks[-1]
    if last > first:
        per_step = (t1 - t0) / (last - first)
        print(
            f"steps {first + 1}-{last}: {per_step:.3f} s/step, "
            f"{config.masks_per_image / per_step:.1f} masks/s "
            f"({config.masks_per_image} masks x {config.rounds} rounds a step); "
            f"all {result.steps} steps {result.seconds:.1f} s; cache {result.cache_seconds:.1f} s",
            flush=True,
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if device.type == "cuda":
        print(f"torch.cuda.max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
