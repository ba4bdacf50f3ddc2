"""Reading completed stage outputs back: which stage+round an export takes, and its records."""

from __future__ import annotations

from typing import Any

from engine.records import ImageMeta, ImageRecord
from sharding.store import PRIVACY_STAGE, Store, check_stage
from sharding.tables import table_to_masks


def release_name(image_id: int) -> str:
    return f"sa_{image_id}"


def blurred_counts(meta: dict[str, Any]) -> dict[str, int]:
    """What the privacy stage blurred in one image (its output's meta): the per-image counts a
    release carries in its metadata (`image.blurred` in SA-1B records and COCO image entries)."""
    return {"faces": int(meta.get("faces", 0)), "plates": int(meta.get("plates", 0))}


def completed(
    store: Store, stage: str, round_: int, check: str = "sha256"
) -> dict[str, dict[str, Any]]:
    """shard -> completion record, for the shards of (stage, round) that are validly done; by
    default every output byte checked against its sha256 (what leaves the store is what was
    committed; `Store.done_record`)."""
    records = {}
    for shard in store.shards():
        record = store.done_record(stage, round_, shard, check)
        if record is not None:
            records[shard] = record
    return records


def resolve_annotation_source(
    store: Store, stage: str | None = None, round_: int | None = None
) -> tuple[str, int]:
    """The (stage, round) an export reads masks from.

    Default: the latest completed annotation output (every shard done; latest by completion
    time; the privacy stage is never an annotation source). With `stage` alone: that stage's
    highest round with at least one finished shard.
    """
    if stage is not None:
        check_stage(stage, round_ if round_ is not None else 0)
        rounds = store.rounds(stage)
        if round_ is None:
            rounds = [r for r in rounds if completed(store, stage, r, check="size")]
            if not rounds:
                raise ValueError(
                    f"stage '{stage}' has no finished shards in {store.root}: run it first "
                    f"or see `sa-engine status {store.root}`"
                )
            return stage, rounds[-1]
        if not completed(store, stage, round_, check="size"):
            raise ValueError(
                f"{stage} round {round_} has no finished shards in {store.root}: "
                f"see `sa-engine status {store.root}` for what exists"
            )
        return stage, round_
    if round_ is not None:
        raise ValueError("--round needs --stage: name the stage whose round to export")
    best: tuple[str, str, int] | None = None
    shards = set(store.shards())
    for s, r in store.stage_rounds():
        if s == PRIVACY_STAGE:
            continue
        records = completed(store, s, r, check="size")
        if shards and set(records) == shards:
            finished = max(rec["finished_at"] for rec in records.values())
            if best is None or finished > best[0]:
                best = (finished, s, r)
    if best is None:
        raise ValueError(
            f"no stage has finished every shard of {store.root}: finish a stage, or pass "
            "--stage (and --round) to export a partial one"
        )
    return best[1], best[2]


def shard_records(
    store: Store, stage: str, round_: int, shard: str, record: dict[str, Any]
) -> dict[int, ImageRecord]:
    """image_id -> ImageRecord (store frame, file_name sa_<id>.jpg) for the images a shard output
    finished, with or without masks."""
    sizes = store.image_sizes(record["images"])
    masks = table_to_masks(store.read_annotations(stage, round_, shard))
    out = {}
    for image_id in record["images"]:
        width, height = sizes[image_id]
        meta = ImageMeta(
            image_id=image_id, width=width, height=height, file_name=f"{release_name(image_id)}.jpg"
        )
        out[image_id] = ImageRecord(meta, masks.get(image_id, []))
    return out
