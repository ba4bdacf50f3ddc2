"""Arrow schemas of the store's tables and the conversions between `MaskRecord`s and rows.

One row per annotation (`ANNOTATIONS`) is what stage outputs hold, what `export parquet` writes and
what training reads; the SA-1B JSON and COCO exports are built from it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa

from engine.records import MaskRecord

MANIFEST = pa.schema(
    [
        ("image_id", pa.int64()),
        ("source", pa.string()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("shard", pa.string()),
        ("original_mode", pa.string()),
        ("exif_rotated", pa.bool_()),
    ]
)
SHARD = pa.schema(
    [
        ("image_id", pa.int64()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("data", pa.binary()),
    ]
)
DUPLICATES = pa.schema(
    [
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("image_id", pa.int64()),
        ("kept_source", pa.string()),
    ]
)
QUARANTINE = pa.schema(
    [
        ("stage", pa.string()),
        ("round", pa.int32()),
        ("shard", pa.string()),
        ("image_id", pa.int64()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
ANNOTATIONS = pa.schema(
    [
        ("image_id", pa.int64()),
        ("id", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
        ("area", pa.int64()),
        ("predicted_iou", pa.float64()),
        ("stability_score", pa.float64()),
        ("rle_size", pa.list_(pa.int32())),
        ("rle_counts", pa.string()),
        ("crop_box", pa.list_(pa.float64())),
        ("point_coords", pa.list_(pa.list_(pa.float64()))),
        ("stage", pa.string()),
        ("round", pa.int32()),
    ]
)
OUTPUT_IMAGES = pa.schema(
    [
        ("image_id", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("data", pa.binary()),
        ("meta", pa.string()),
    ]
)


def masks_to_table(masks: Iterable[tuple[int, MaskRecord]], stage: str, round_: int) -> pa.Table:
    """(image_id, MaskRecord) pairs to an `ANNOTATIONS` table."""
    rows: dict[str, list[Any]] = {name: [] for name in ANNOTATIONS.names}
    for image_id, m in masks:
        rows["image_id"].append(int(image_id))
        rows["id"].append(int(m.id))
        rows["bbox"].append([float(v) for v in m.bbox])
        rows["area"].append(int(m.area))
        rows["predicted_iou"].append(float(m.predicted_iou))
        rows["stability_score"].append(float(m.stability_score))
        rows["rle_size"].append([int(v) for v in m.segmentation["size"]])
        counts = m.segmentation["counts"]
        rows["rle_counts"].append(counts.decode("ascii") if isinstance(counts, bytes) else counts)
        rows["crop_box"].append([float(v) for v in m.crop_box])
        rows["point_coords"].append([[float(v) for v in p] for p in m.point_coords])
        rows["stage"].append(stage)
        rows["round"].append(int(round_))
    return pa.Table.from_pydict(rows, schema=ANNOTATIONS)


def table_to_masks(table: pa.Table) -> dict[int, list[MaskRecord]]:
    """An `ANNOTATIONS` table back to MaskRecords grouped by image_id (row order kept)."""
    out: dict[int, list[MaskRecord]] = {}
    for row in table.to_pylist():
        out.setdefault(row["image_id"], []).append(
            MaskRecord(
                id=row["id"],
                segmentation={"size": row["rle_size"], "counts": row["rle_counts"]},
                bbox=row["bbox"],
                area=row["area"],
                predicted_iou=row["predicted_iou"],
                stability_score=row["stability_score"],
                crop_box=row["crop_box"],
                point_coords=row["point_coords"],
            )
        )
    return out


def quarantine_rows(entries: list[dict[str, Any]]) -> pa.Table:
    rows = {name: [e.get(name) for e in entries] for name in QUARANTINE.names}
    return pa.Table.from_pydict(rows, schema=QUARANTINE)


def meta_json(meta: dict[str, Any] | None) -> str:
    return json.dumps(meta or {}, sort_keys=True)
