"""SA-1B records: one `ImageRecord` per image, class-agnostic `MaskRecord`s inside it.

The JSON form is exactly SA-1B's: {"image": {...}, "annotations": [...]}, segmentation as COCO
compressed RLE (see `engine.rle`), boxes XYWH in the image's pixel frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_json

SCHEMA_VERSION = 1


@dataclass
class MaskRecord:
    """One class-agnostic mask. bbox and crop_box are XYWH; point_coords are [[x, y]] in image pixels."""

    id: int
    segmentation: dict[str, Any]
    bbox: list[float]
    area: int
    predicted_iou: float
    stability_score: float
    crop_box: list[float]
    point_coords: list[list[float]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "MaskRecord":
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


@dataclass
class ImageMeta:
    image_id: int
    width: int
    height: int
    file_name: str


@dataclass
class ImageRecord:
    image: ImageMeta
    annotations: list[MaskRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"image": asdict(self.image), "annotations": [a.to_json() for a in self.annotations]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ImageRecord":
        return cls(ImageMeta(**obj["image"]), [MaskRecord.from_json(a) for a in obj["annotations"]])

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())
