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
        # Annotation effort (gears 1 and 2; null for the automatic gear and for older tables,
        # which read back with these columns null): clicks made, IoU with the reference when the
        # mask was accepted (null without a reference: a person), seconds spent (simulated or
        # real), whether the mask was prefilled by the detector (gear 2) or added by an annotator,
        # who annotated it ("simulated", "person", "detector"), and whether the annotator finished
        # the mask with brush and eraser after the clicks (`annotate.refine`; iou is the clicks').
        ("clicks", pa.int32()),
        ("iou", pa.float64()),
        ("seconds", pa.float64()),
        ("prefilled", pa.bool_()),
        ("annotator", pa.string()),
        ("brushed", pa.bool_()),
    ]
)
EFFORT_COLUMNS = ("clicks", "iou", "seconds", "prefilled", "annotator", "brushed")
EMBEDDINGS = pa.schema(
    [
        ("image_id", pa.int64()),
        ("data", pa.binary()),  # engine.predictor.ImageEmbedding.to_bytes() (.npz)
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


def masks_to_table(
    masks: Iterable[tuple[int, MaskRecord]],
    stage: str,
    round_: int,
    effort: dict[int, dict[str, Any]] | None = None,
) -> pa.Table:
    """(image_id, MaskRecord) pairs to an `ANNOTATIONS` table.

    effort: annotation id -> {clicks, iou, seconds, prefilled, annotator, brushed} (any subset;
    missing keys and masks without an entry are null).
    """
    rows: dict[str, list[Any]] = {name: [] for name in ANNOTATIONS.names}
    effort = effort or {}
    for image_id, m in masks:
        spent = effort.get(int(m.id), {})
        unknown = sorted(set(spent) - set(EFFORT_COLUMNS))
        if unknown:
            raise ValueError(f"mask {m.id}: unknown effort keys {unknown}; use {EFFORT_COLUMNS}")
        for name in EFFORT_COLUMNS:
            rows[name].append(spent.get(name))
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
