"""COCO instances export (one JSON) and Parquet tables of one annotation output.

COCO: one category "object" (SA-1B masks are class-agnostic), compressed-RLE segmentation,
iscrowd 0, `bbox` COCO's tight box of the mask (pycocotools' `toBbox`, what COCOeval and loaders
expect; SA-1B records carry SAM's box, one pixel less in w and h: `engine.rle.sam_bbox_xywh`),
file names `sa_<id>.jpg`, each image entry with what was blurred in it (`"blurred": {"faces": n,
"plates": m}`, from the highest privacy round, where it has the image); by default in the release
frame (shortest side 1500), so it pairs with the images of `export sa1b`. `predicted_iou` and
`stability_score` are kept as extra keys (pycocotools and CVAT ignore them).

Parquet: `OUT/annotations/<shard>.parquet` (one row per mask: image_id, id, bbox, area,
predicted_iou, stability_score, rle_size, rle_counts, crop_box, point_coords, stage, round) and
`OUT/images.parquet` (image_id, width, height, file_name, shard, source, sha256), in the store
frame (the frame training reads images in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import rle
from engine.atomic import atomic_path
from sharding.outputs import (
    blurred_counts,
    completed,
    release_name,
    resolve_annotation_source,
    shard_records,
)
from sharding.rescale import RELEASE_SHORT_SIDE, release_size, rescale_record
from sharding.store import PRIVACY_STAGE, Store, utc_now

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def export_coco(
    store: Store,
    out_path: str | Path,
    *,
    stage: str | None = None,
    round_: int | None = None,
    short_side: int = RELEASE_SHORT_SIDE,
) -> dict[str, Any]:
    """Write one COCO instances JSON of (stage, round) (default: latest completed). Returns counts.

    Streamed a shard at a time: annotations are written as they are read (the image entries,
    small, are kept and written after them: COCO readers take the keys in any order), so memory
    holds one shard's records, not the whole JSON (SA-1B's 1.1B masks are terabytes of it)."""
    stage, round_ = resolve_annotation_source(store, stage, round_)
    info = {
        "description": f"sa-engine export of {stage} round {round_}",
        "date_created": utc_now(),
        "version": "1",
    }
    images: list[dict[str, Any]] = []
    annotations = 0
    privacy_rounds = store.rounds(PRIVACY_STAGE)
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        head = json.dumps({"info": info, "licenses": [], "categories": [CATEGORY]})
        out.write(head[:-1] + ', "annotations": [')
        for shard, record in completed(store, stage, round_).items():
            blurred = (
                store.output_image_meta(PRIVACY_STAGE, privacy_rounds[-1], shard) if privacy_rounds else {}
            )
            for image_id, rec in sorted(shard_records(store, stage, round_, shard, record).items()):
                size = release_size(rec.image.width, rec.image.height, short_side)
                rec = rescale_record(rec, *size)
                images.append(
                    {
                        "id": image_id,
                        "file_name": rec.image.file_name,
                        "width": rec.image.width,
                        "height": rec.image.height,
                        **({"blurred": blurred_counts(blurred[image_id])} if image_id in blurred else {}),
                    }
                )
                tight = rle.bbox_xywh([m.segmentation for m in rec.annotations])  # COCO's box
                for k, m in enumerate(rec.annotations):
                    annotation = {
                        "id": m.id,
                        "image_id": image_id,
                        "category_id": CATEGORY["id"],
                        "segmentation": m.segmentation,
                        "area": m.area,
                        "bbox": tight[k].tolist(),
                        "iscrowd": 0,
                        "predicted_iou": m.predicted_iou,
                        "stability_score": m.stability_score,
                    }
                    out.write(("," if annotations else "") + json.dumps(annotation))
                    annotations += 1
        out.write('], "images": ' + json.dumps(images) + "}")
    return {"stage": stage, "round": round_, "images": len(images), "annotations": annotations}


def export_parquet(
    store: Store, out_dir: str | Path, *, stage: str | None = None, round_: int | None = None
) -> dict[str, Any]:
    """Write the annotation tables of (stage, round) and an images table. Returns counts."""
    out_dir = Path(out_dir)
    stage, round_ = resolve_annotation_source(store, stage, round_)
    done = completed(store, stage, round_)
    rows = 0
    image_ids: set[int] = set()
    for shard, record in done.items():
        table = store.read_annotations(stage, round_, shard)
        rows += table.num_rows
        image_ids.update(record["images"])
        with atomic_path(out_dir / "annotations" / f"{shard}.parquet") as tmp:
            pq.write_table(table, tmp)
    manifest = store.manifest()
    keep = pc.is_in(manifest.column("image_id"), value_set=pa.array(sorted(image_ids), pa.int64()))
    images = manifest.filter(keep).select(
        ["image_id", "width", "height", "shard", "source", "sha256"]
    )
    images = images.append_column(
        "file_name",
        pa.array(
            [f"{release_name(i)}.jpg" for i in images.column("image_id").to_pylist()], pa.string()
        ),
    )
    with atomic_path(out_dir / "images.parquet") as tmp:
        pq.write_table(images, tmp)
    for old in (out_dir / "annotations").glob("*.parquet"):  # an earlier export's other shards:
        if old.stem not in done:  # a reader of the folder would take them for this export's
            old.unlink()
    return {
        "stage": stage,
        "round": round_,
        "images": images.num_rows,
        "annotations": rows,
        "shards": len(done),
    }
