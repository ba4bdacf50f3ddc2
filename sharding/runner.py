"""The stage-agnostic shard runner: every stage (privacy, the gears) runs through it.

For each pending shard it streams the original images, decodes them with `engine.image_io`,
calls the stage's per-image function, gives every mask its final id and commits the shard's
output + completion record through `Store.write_shard_output`. Finished shards are skipped;
shards without a valid completion record are redone from scratch, so a killed run loses nothing
and, because ids are deterministic, duplicates nothing.

Annotation ids: `id = image_id * 65536 + k`, k the mask's index in the stage's output for that
image (at most 65,536 masks per image; image ids below 2**37). Unique within one stage+round
output (what an export holds), stable across reruns, and below 2**53 so JSON readers keep them
exact. The (stage, round) columns of the annotation tables tell outputs of different rounds apart.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.heap import release_freed_memory
from engine.image_io import ImageLoadError, load_image
from engine.records import ImageRecord, MaskRecord
from sharding.store import ImageRow, ShardOutput, Store, check_stage, utc_now

MASKS_PER_IMAGE = 1 << 16
MAX_IMAGE_ID = 1 << 37


@dataclass
class StageResult:
    """What a stage's per-image function returns.

    masks: in the image's store frame (manifest width x height); their ids are replaced.
    image: an encoded output image (JPEG/PNG bytes) of the same size, e.g. the blurred photo.
    meta: per-image facts kept beside the output image (e.g. {"faces": 2, "plates": 0}).
    effort: one dict per mask, in the order of `masks`, for the gears with annotators (clicks,
      iou, seconds, prefilled, annotator, brushed; see `sharding.tables.ANNOTATIONS`); empty
      otherwise.
    extra: anything picklable the stage's shard step needs besides the output (Ray pipeline:
      `stages.steps.StageSpec.commit`, e.g. a new image embedding, the masks given up); it is
      not stored by the runner.
    failure: the image failed after `extra` was made: it is quarantined as `stage_error`, as if
      the function had raised `failure`, and `extra` still reaches the shard step.
    """

    masks: list[MaskRecord] = field(default_factory=list)
    image: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    effort: list[dict[str, Any]] = field(default_factory=list)
    extra: Any = None
    failure: Exception | None = None

    @classmethod
    def from_record(cls, record: ImageRecord) -> "StageResult":
        """A stage that already builds SA-1B `ImageRecord`s (e.g. the AMG) hands over its masks."""
        return cls(masks=list(record.annotations))


ProcessFn = Callable[[ImageRow, np.ndarray], StageResult]


@dataclass
class RunReport:
    stage: str
    round: int
    skipped: list[str] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    quarantined: int = 0
    seconds: float = 0.0


def annotation_id(image_id: int, index: int) -> int:
    """The id rule (module docstring): image_id * 65536 + index."""
    if not 0 <= index < MASKS_PER_IMAGE:
        raise ValueError(
            f"image {image_id}: mask index {index} exceeds {MASKS_PER_IMAGE} masks per image"
        )
    if not 0 < image_id < MAX_IMAGE_ID:
        raise ValueError(f"image id {image_id} is outside 1..2**37: annotation ids would not fit")
    return image_id * MASKS_PER_IMAGE + index


def pending_shards(store: Store, stage: str, round_: int) -> list[str]:
    """Shards of the store without a valid completion record for this stage and round."""
    check_stage(stage, round_)
    return [s for s in store.shards() if store.done_record(stage, round_, s) is None]


@dataclass
class ImageOutcome:
    """One image's share of its shard's output: done (masks with final ids, optional output
    image) or quarantined (an entry with reason and detail). Both runners (this module's loop and
    the Ray pipeline in `stages/`) build these with `decode_row` / `apply_stage` and fold them
    into a `ShardOutput` with `add_outcome`, so the per-image rules live in one place.
    """

    image_id: int
    masks: list[MaskRecord] = field(default_factory=list)
    image: bytes | None = None
    info: tuple[int, int, dict[str, Any]] | None = None
    quarantined: dict[str, Any] | None = None
    effort: list[dict[str, Any]] = field(default_factory=list)  # one per mask, or none
    extra: Any = None  # `StageResult.extra`, for the stage's shard step


def decode_row(row: ImageRow, *, max_pixels: int, min_side: int) -> np.ndarray | ImageOutcome:
    """Decode a shard row with the one image loader; a broken image becomes a quarantine outcome.

    Returns:
      (np.ndarray | ImageOutcome): HxWx3 uint8 RGB, or the quarantined outcome with its reason.
    """
    try:
        return load_image(row.data, name=row.source, max_pixels=max_pixels, min_side=min_side)
    except ImageLoadError as err:
        return ImageOutcome(row.image_id, quarantined=unreadable_entry(row, err))


def unreadable_entry(row: ImageRow, err: ImageLoadError) -> dict[str, Any]:
    """The quarantine entry of a shard row the image loader refused: its reason, detail and fix."""
    return _entry(row, err.reason, f"{err.detail} ({err.fix})")


def apply_stage(stage: str, row: ImageRow, rgb: np.ndarray, process: ProcessFn) -> ImageOutcome:
    """Run a stage's per-image function and check what it returned (see `check_result`)."""
    try:
        result = process(row, rgb)
    except Exception as exc:  # one image's failure is recorded, never stops the shard
        return stage_error(row, exc)
    return check_result(stage, row, rgb.shape, result)


def stage_error(row: ImageRow, exc: Exception, extra: Any = None) -> ImageOutcome:
    """The quarantine outcome of an image whose stage function raised `exc`."""
    return ImageOutcome(
        row.image_id,
        quarantined=_entry(row, "stage_error", f"{type(exc).__name__}: {exc}"),
        extra=extra,
    )


def check_result(
    stage: str, row: ImageRow, shape: tuple[int, ...], result: StageResult
) -> ImageOutcome:
    """Give a stage's masks their final ids and check they (and any output image) are in the
    image's frame `shape` (H, W, 3); a violation (or `result.failure`) quarantines the image as
    `stage_error`. `result.extra` is kept either way.
    """
    if result.failure is not None:
        return stage_error(row, result.failure, result.extra)
    try:
        masks = [
            dataclasses.replace(m, id=annotation_id(row.image_id, k))
            for k, m in enumerate(result.masks)
        ]
        _check_frame(shape, masks)
        if result.effort and len(result.effort) != len(masks):
            raise ValueError(
                f"{len(result.effort)} effort entries for {len(masks)} masks: give one per mask"
            )
        if result.image is not None:
            shown = load_image(result.image, name=f"{stage} output of image {row.image_id}")
            if shown.shape != tuple(shape):
                raise ValueError(
                    f"output image is {shown.shape[1]}x{shown.shape[0]}, input "
                    f"{shape[1]}x{shape[0]}: stages must keep the image size"
                )
    except Exception as exc:
        return stage_error(row, exc, result.extra)
    info = None if result.image is None else (int(shape[1]), int(shape[0]), result.meta)
    return ImageOutcome(
        row.image_id,
        masks=masks,
        image=result.image,
        info=info,
        effort=list(result.effort),
        extra=result.extra,
    )


def add_outcome(out: ShardOutput, outcome: ImageOutcome) -> None:
    """Fold one image's outcome into its shard's output (order does not matter: the store sorts)."""
    if outcome.quarantined is not None:
        out.quarantined.append(outcome.quarantined)
        return
    out.done.append(outcome.image_id)
    out.masks.extend((outcome.image_id, m) for m in outcome.masks)
    out.effort.update((m.id, spent) for m, spent in zip(outcome.masks, outcome.effort))
    if outcome.image is not None:
        out.images[outcome.image_id] = outcome.image
        out.image_info[outcome.image_id] = outcome.info


def process_shard(
    store: Store,
    stage: str,
    round_: int,
    shard: str,
    process: ProcessFn,
    meta: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run `process` over one shard and commit its output. Returns the completion record.

    A broken image (undecodable, or `process` raising, or output of the wrong size) is recorded
    in the shard's quarantine list with its reason and the shard goes on. `meta`, called once the
    shard's images are done, gives the completion record's `meta` (e.g. an annotator's settings
    and the masks it gave up on).
    """
    out = ShardOutput()
    for row in store.iter_shard(shard):
        decoded = decode_row(row, max_pixels=store.max_pixels, min_side=store.min_side)
        if isinstance(decoded, ImageOutcome):
            add_outcome(out, decoded)
        else:
            add_outcome(out, apply_stage(stage, row, decoded, process))
        release_freed_memory()
    if meta is not None:
        out.meta = meta()
    return store.write_shard_output(stage, round_, shard, out)


def run_stage(
    store: Store,
    stage: str,
    round_: int,
    process: ProcessFn,
    shards: list[str] | None = None,
    on_shard: Callable[[str, dict[str, Any]], None] | None = None,
    meta: Callable[[], dict[str, Any]] | None = None,
) -> RunReport:
    """Process every pending shard (or the given ones, if pending) in order; skip finished ones.

    Arguments:
      store (Store): the store.
      stage (str), round_ (int): where outputs go: STORE/stages/<stage>/round-<round_>/.
      process (ProcessFn): (ImageRow, HxWx3 uint8 RGB) -> StageResult.
      shards (list[str] | None): restrict to these shards.
      on_shard: called with (shard, completion record) after each shard is committed.
      meta: called after each shard's images, gives its completion record's `meta`.
    """
    check_stage(stage, round_)
    started, t0 = utc_now(), time.perf_counter()
    report = RunReport(stage, round_)
    todo = pending_shards(store, stage, round_)
    if shards is not None:
        store.check_shards(shards)
    wanted = store.shards() if shards is None else shards
    record_path = store.run_record_path(stage, started, round_)

    def write_record(state: str, **extra: Any) -> None:
        report.seconds = time.perf_counter() - t0
        ended = {} if state == "running" else {"finished_at": utc_now()}
        store.write_run_record(
            stage, {"started_at": started, **ended, "state": state, **report.__dict__, **extra}, record_path
        )

    with store.running(record_path):  # `status` tells a killed run from one going on
        try:
            for shard in wanted:
                if shard not in todo:
                    report.skipped.append(shard)
                    continue
                record = process_shard(store, stage, round_, shard, process, meta)
                report.processed.append(shard)
                report.images += record["counts"]["images"]
                report.annotations += record["counts"]["annotations"]
                report.quarantined += record["counts"]["quarantined"]
                write_record("running")
                if on_shard is not None:
                    on_shard(shard, record)
        except KeyboardInterrupt:  # committed shards stay; the record says the run stopped
            write_record("stopped")
            raise
        except Exception as exc:
            write_record("failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            raise
        write_record("finished")
    return report


def _entry(row: ImageRow, reason: str, detail: str) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "source": row.source,
        "sha256": row.sha256,
        "reason": reason,
        "detail": detail,
    }


def _check_frame(shape: tuple[int, ...], masks: list[MaskRecord]) -> None:
    size = [int(shape[0]), int(shape[1])]
    for m in masks:
        if list(m.segmentation["size"]) != size:
            raise ValueError(
                f"mask {m.id} has size {m.segmentation['size']}, image is {size} (h, w): "
                "masks must be in the image's frame"
            )
