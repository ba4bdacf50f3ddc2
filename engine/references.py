"""Reference masks in COCO JSON, for the simulated annotators of gears 1 and 2.

A batch run of an annotation gear needs something to click towards: the reference masks of a COCO
instances (or keypoints) file. Its images are matched to store images by path: the COCO
`file_name` must be a suffix of the store image's source path (`coco/0001.jpg` matches
`/data/images/coco/0001.jpg`), or, failing that, the only reference image with that base name.
Polygons and RLE (compressed or not) are decoded through pycocotools (`engine.rle`); crowd regions
are not objects a person would outline and are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from engine import rle


@dataclass
class Reference:
    """One reference object: its COCO annotation id and mask (compressed RLE, image frame)."""

    annotation_id: int
    segmentation: rle.Rle
    area: int

    def mask(self) -> np.ndarray:
        """HxW bool."""
        return rle.decode(self.segmentation)


@dataclass
class ReferenceImage:
    file_name: str
    width: int
    height: int
    references: list[Reference] = field(default_factory=list)


@dataclass
class ReferenceSet:
    """The reference images of one COCO file, findable by a store image's source path.

    skipped: annotation counts left out, by reason ("iscrowd", "empty", "no_image").
    """

    path: str
    images: list[ReferenceImage]
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name: dict[str, list[ReferenceImage]] = {}
        for image in self.images:
            self._by_name.setdefault(PurePosixPath(image.file_name).name, []).append(image)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceSet":
        """Read a COCO JSON file (images + annotations with segmentation)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"references file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"references file {path} is not JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(
                f"references file {path} is not COCO JSON: it needs 'images' and 'annotations' lists"
            )
        return cls.from_coco(data, str(path))

    @classmethod
    def from_coco(cls, data: dict[str, Any], name: str = "references") -> "ReferenceSet":
        images: dict[int, ReferenceImage] = {}
        for entry in data["images"]:
            try:
                images[int(entry["id"])] = ReferenceImage(
                    str(entry["file_name"]), int(entry["width"]), int(entry["height"])
                )
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{name}: image entry {str(entry)[:120]} needs id, file_name, width, height"
                ) from None
        skipped: dict[str, int] = {}
        for ann in data.get("annotations") or []:
            image = images.get(ann.get("image_id"))
            reason = None
            if image is None:
                reason = "no_image"
            elif ann.get("iscrowd"):
                reason = "iscrowd"
            else:
                try:
                    segmentation = coco_segmentation(ann.get("segmentation"), image)
                except ValueError as exc:
                    raise ValueError(f"{name}: annotation {ann.get('id')}: {exc}") from None
                area = int(rle.area([segmentation])[0])
                if area == 0:
                    reason = "empty"
                else:
                    image.references.append(Reference(int(ann["id"]), segmentation, area))
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
        return cls(name, list(images.values()), skipped)

    def match(self, source: str) -> ReferenceImage | None:
        """The reference image of a store image's source path, or None (see module docstring)."""
        parts = PurePosixPath(source.removeprefix("file://")).parts
        candidates = self._by_name.get(parts[-1] if parts else "", [])
        suffix = [
            c for c in candidates if _is_suffix(PurePosixPath(c.file_name.lstrip("/")).parts, parts)
        ]
        if suffix:
            return max(suffix, key=lambda c: len(PurePosixPath(c.file_name).parts))
        return candidates[0] if len(candidates) == 1 else None

    @property
    def n_references(self) -> int:
        return sum(len(i.references) for i in self.images)


def coco_segmentation(segmentation: Any, image: ReferenceImage) -> rle.Rle:
    """A COCO segmentation (polygon list, uncompressed or compressed RLE) as compressed RLE."""
    size = (image.height, image.width)
    if isinstance(segmentation, list):
        return rle.from_polygons(segmentation, size)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != list(size):
            raise ValueError(
                f"RLE size {segmentation['size']} differs from its image's {list(size)} (h, w)"
            )
        if isinstance(segmentation["counts"], list):
            return rle.from_uncompressed(size, segmentation["counts"])
        return {"size": list(size), "counts": segmentation["counts"]}
    raise ValueError("segmentation must be COCO polygons or RLE (size + counts)")


def _is_suffix(short: tuple[str, ...], long: tuple[str, ...]) -> bool:
    return 0 < len(short) <= len(long) and tuple(long[-len(short) :]) == tuple(short)
