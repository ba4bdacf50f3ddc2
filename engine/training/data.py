"""Where training and the gate get their images and reference masks.

- `store_items`: the masks a store's gears collected (`STORE/stages/<gear>/round-<k>/`), decoded
  from the annotation tables with the engine's one RLE path, on the images the gears saw (the
  privacy stage's blurred images when the store has them, else the ingested originals).
- `coco_items`: a COCO instances JSON and its image folder (pycocotools decodes polygons and RLE).
- `synthetic_items`: generated scenes (see `synthetic.py`), a pure function of the seed.

Every source splits its images into a training part and a held-out part with `is_held_out`, one
deterministic rule on the image id, so `train` never sees the images `evaluate` judges on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from engine import rle
from engine.checks import invalid
from engine.image_io import load_image
from engine.training.synthetic import SceneConfig, make_scene, photo_library
from engine.training.trainer import MasksDoNotFitImage, TrainItem

SYNTHETIC = "synthetic"


@dataclass
class DataConfig:
    """The data keys of the `train:` block, for `train` and `evaluate`.

    Attributes:
      held_out_share (float): share of every source's images (`is_held_out`) that training never
        sees and the gate scores on.
      synthetic_scenes (int): scenes of `--from synthetic`, seeds `synthetic_seed` onwards.
      synthetic_seed (int): the first scene's seed.
    """

    held_out_share: float = 0.1
    synthetic_scenes: int = 600
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.held_out_share < 1:
            raise invalid(
                "train.held_out_share", self.held_out_share,
                "a share in [0, 1) (0: no held-out images)",
            )  # fmt: skip
        if self.synthetic_scenes < 1:
            raise invalid("train.synthetic_scenes", self.synthetic_scenes, "a whole number >= 1")
        if self.synthetic_seed < 0:
            raise invalid("train.synthetic_seed", self.synthetic_seed, "a whole number >= 0")


def trained_held_out_share(
    cards: Iterable[dict[str, Any]], sources: Iterable[str] | None = None
) -> float | None:
    """The smallest held-out share the model cards' training data was split with (`data`, and
    `lineage` stages), of the `sources` kinds only ("store", "coco", "synthetic"; None: all),
    or None when none records one. An image held out at that share was held out from every one
    of them: `is_held_out` at a smaller share picks a subset."""
    kinds = None if sources is None else set(sources)
    shares = [
        float(entry["held_out_share"])
        for card in cards
        for data in [card.get("data") or []] + [s.get("data") or [] for s in card.get("lineage") or []]
        for entry in data
        if entry.get("split") == "train" and "held_out_share" in entry
        and (kinds is None or entry.get("source") in kinds)
    ]  # fmt: skip
    return min(shares) if shares else None


def is_held_out(image_id: str | int, share: float) -> bool:
    """True for about `share` of all ids, the same ones on every run and machine."""
    if share <= 0:
        return False
    digest = hashlib.sha256(str(image_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _pick(image_id: str | int, split: str, share: float) -> bool:
    if split == "all":
        return True
    held = is_held_out(image_id, share)
    return held if split == "held_out" else not held


def _check_split(split: str) -> None:
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split '{split}' is invalid: use train, held_out or all")


def store_items(
    store_root: str | Path,
    gears: Iterable[str],
    max_round: int | None = None,
    split: str = "train",
    held_out_share: float = 0.1,
) -> tuple[list[TrainItem], dict[str, object]]:
    """Images and masks collected by `gears` in a store, stage rounds <= `max_round`.

    Returns the items and a description of the data for the model card.
    """
    from sharding import PRIVACY_STAGE, Store
    from sharding.tables import table_to_masks

    _check_split(split)
    store = Store(store_root)
    gears = list(gears)
    present = store.stage_rounds()
    masks: dict[int, list[dict]] = {}
    used: list[str] = []
    for gear in gears:
        rounds = [r for s, r in present if s == gear and (max_round is None or r <= max_round)]
        if not rounds:
            have = sorted({s for s, _ in present}) or ["none"]
            raise ValueError(
                f"store {store_root} has no masks from gear '{gear}'"
                + (f" at rounds <= {max_round}" if max_round is not None else "")
                + f" (stages there: {', '.join(have)}); run that gear first or pick another --from"
            )
        for round_ in rounds:
            for shard in store.shards():
                if store.done_record(gear, round_, shard) is None:
                    continue
                table = store.read_annotations(gear, round_, shard)
                for image_id, records in table_to_masks(table).items():
                    masks.setdefault(image_id, []).extend(r.segmentation for r in records)
            used.append(f"{gear}/round-{round_}")
    wanted = {i for i in masks if _pick(i, split, held_out_share)}
    blurred = _privacy_images(store, wanted, PRIVACY_STAGE)
    items = []
    for shard in store.shards():
        for row in store.iter_shard(shard):
            if row.image_id not in wanted:
                continue
            data = blurred.get(row.image_id, row.data)
            items.append(
                TrainItem(
                    f"store:{row.image_id}",
                    lambda data=data, rles=masks[row.image_id], label=row.source: (
                        load_image(data, name=label),
                        list(rle.decode(rles)),
                    ),
                )
            )
    info = {
        "source": "store",
        "store": str(store_root),
        "stages": used,
        "split": split,
        "held_out_share": held_out_share,
        "images": len(items),
        "masks": sum(len(masks[i]) for i in wanted),
        "privacy_images": len(blurred),
    }
    return items, info


def _privacy_images(store, wanted: set[int], stage: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    rounds = store.rounds(stage)
    for round_ in rounds[:1]:
        for shard in store.shards():
            for image_id, data, _ in store.iter_output_images(stage, round_, shard):
                if image_id in wanted:
                    out[image_id] = data
    return out


def coco_items(
    annotations: str | Path,
    images: str | Path,
    split: str = "train",
    held_out_share: float = 0.1,
    include_crowd: bool = False,
) -> tuple[list[TrainItem], dict[str, object]]:
    """Images and instance masks of a COCO JSON (`file_name` relative to `images`)."""
    from pycocotools.coco import COCO

    _check_split(split)
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise ValueError(f"COCO file {annotations} does not exist: pass --coco FILE.json")
    if not images.is_dir():
        raise ValueError(f"image folder {images} does not exist: pass --images DIR")
    try:
        coco = _quiet_coco(COCO, annotations)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"COCO file {annotations}: cannot be read ({exc})") from None
    for ann in coco.dataset.get("annotations", []):  # before any work, not at the first image
        segmentation = ann.get("segmentation")
        if not (
            (isinstance(segmentation, list) and segmentation)
            or (isinstance(segmentation, dict) and {"counts", "size"} <= set(segmentation))
        ):
            raise ValueError(
                f"COCO file {annotations}: annotation {ann.get('id')} has no mask (segmentation "
                "must be COCO polygons or RLE: size + counts); a file of boxes or keypoints "
                "cannot train or judge a segmenter"
            )
    items = []
    n_masks = 0
    for image_id in sorted(coco.getImgIds()):
        if not _pick(image_id, split, held_out_share):
            continue
        anns = [
            a
            for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
            if include_crowd or not a.get("iscrowd", 0)
        ]
        if not anns:
            continue
        info = coco.loadImgs([image_id])[0]
        path = images / info["file_name"]
        n_masks += len(anns)
        items.append(
            TrainItem(f"coco:{image_id}", lambda path=path, anns=anns: _coco_image(coco, path, anns))
        )
    info = {
        "source": "coco",
        "annotations": str(annotations),
        "images_dir": str(images),
        "split": split,
        "held_out_share": held_out_share,
        "images": len(items),
        "masks": n_masks,
    }
    return items, info


def _coco_image(coco, path: Path, anns: list[dict]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One COCO image (upright, as every stage reads it) and its masks, which must be of its size:
    a COCO file's width and height are those of the pixels it was drawn on, so an EXIF-rotated
    photo's masks come lying down (MasksDoNotFitImage: the item is left out, with its reason)."""
    image = load_image(path)
    masks = [coco.annToMask(a).astype(bool) for a in anns]
    if masks and masks[0].shape != image.shape[:2]:
        (mh, mw), (ih, iw) = masks[0].shape, image.shape[:2]
        raise MasksDoNotFitImage(
            f"{path}: its masks in the COCO file are {mw}x{mh}, the image is {iw}x{ih} (EXIF-rotated?): "
            "give the masks in the image's upright frame, or leave the image out"
        )
    return image, masks


def _quiet_coco(cls, path: Path):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return cls(str(path))


def synthetic_items(
    count: int, seed: int = 0, split: str = "train", held_out_share: float = 0.1
) -> tuple[list[TrainItem], dict[str, object]]:
    """`count` generated scenes, seeds seed..seed+count-1 (held-out ones dropped from training)."""
    _check_split(split)
    if count < 1:
        raise ValueError(f"synthetic scene count {count} must be >= 1")
    config = SceneConfig()
    photos = photo_library()
    seeds = [s for s in range(seed, seed + count) if _pick(f"synthetic:{s}", split, held_out_share)]
    items = [
        TrainItem(f"synthetic:{s}", lambda s=s: make_scene(s, config, photos)) for s in seeds
    ]
    info = {
        "source": SYNTHETIC,
        "generator": "engine.training.synthetic.make_scene",
        "scene_config": vars(config) if hasattr(config, "__dict__") else str(config),
        "seeds": [seed, seed + count - 1],
        "photo_patches": len(photos),
        "split": split,
        "held_out_share": held_out_share,
        "images": len(items),
    }
    return items, info
