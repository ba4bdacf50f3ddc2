"""A stage as the pipeline runs it (`StageSpec`) and the Ray Data steps it is made of.

    read rows (sharding.Store) -> decode (CPU tasks) -> model actors -> [post-processing (CPU tasks)]

Module-level functions and one callable class, as Ray Data wants; `build_dataset` chains them
over the pending shards. The driver that collects and commits their output is `stages.pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.heap import release_freed_memory
from sharding.runner import (
    ImageOutcome,
    StageResult,
    apply_stage,
    check_result,
    decode_row,
    stage_error,
)
from sharding.store import ImageRow, Store
from stages.config import RayConfig
from stages.resources import ActorPlan


@dataclass(frozen=True)
class StageSpec:
    """A stage as the pipeline runs it.

    name: the store stage its outputs go to (STORE/stages/<name>/round-<k>/).
    make: `make(**make_kwargs)` builds the per-image function; it runs once in each model actor
      (so a model is loaded there, once) and must be importable on every node.
    finish: optional CPU step `finish(row, raw) -> StageResult` run in separate tasks after the
      actor; then the actor's function returns `raw` (anything picklable) instead of a result.
    uses_model: False for model-free stages (no GPUs asked for).
    commit: optional driver step `commit(store, name, round_, shard, output, extras) -> record`
      once all of a shard's images have arrived: `output` (ShardOutput) holds their outcomes,
      `extras` (re-iterable) gives `(image_id, StageResult.extra or None)` for each image in
      image_id order. It writes what the stage keeps (default: `Store.write_shard_output`) and
      returns a completion record (at least `counts` and `quarantined`).
    pending: optional `pending(store, round_) -> shards still to do` (default: the shards without
      a valid completion record of this stage and round), for stages whose `commit` writes no
      stage output.
    shared_with_people: the annotation tool (`serve`) writes this stage's output too (gears 1
      and 2): a run holds the stage round's batch lock, which people's sessions wait for, and
      leaves alone the shards their sessions hold (`Store.hold_batch_run`).
    """

    name: str
    make: Callable[..., Callable[[ImageRow, np.ndarray], Any]]
    make_kwargs: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[ImageRow, Any], StageResult] | None = None
    uses_model: bool = True
    commit: Callable[..., dict[str, Any]] | None = None
    pending: Callable[[Store, int], list[str]] | None = None
    shared_with_people: bool = False


def read_shard(item: dict[str, Any], root: str) -> Iterator[dict[str, Any]]:
    """Rows of one shard (original bytes) through the store, minus the images already received."""
    skip = set(json.loads(item["skip"]))
    for row in Store(root).iter_shard(item["shard"]):
        if row.image_id not in skip:
            yield dataclasses.asdict(row)


def decode(row: dict[str, Any], max_pixels: int, min_side: int) -> dict[str, Any]:
    """Decode one row; a broken image travels on as a finished (quarantined) outcome."""
    t0 = time.perf_counter()
    decoded = decode_row(_image_row(row), max_pixels=max_pixels, min_side=min_side)
    broken = isinstance(decoded, ImageOutcome)
    row["rgb"] = np.zeros((0, 0, 3), np.uint8) if broken else decoded
    row["outcome"] = pickle.dumps(decoded) if broken else b""
    row["decode_s"] = time.perf_counter() - t0
    return row


class ModelActor:
    """A model actor: builds the stage's per-image function once, then runs it image by image.

    Arguments (constructor):
      spec (StageSpec): the stage.
      threads (int): torch threads of this actor (its CPU share).
    """

    def __init__(self, spec: StageSpec, threads: int) -> None:
        if spec.uses_model:
            import torch

            torch.set_num_threads(threads)
        self.spec = spec
        self.process = spec.make(**spec.make_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        outcomes, final, seconds, heights, widths = [], [], [], [], []
        for i in range(n):
            t0 = time.perf_counter()
            rgb = batch["rgb"][i]
            heights.append(int(rgb.shape[0]))
            widths.append(int(rgb.shape[1]))
            if len(batch["outcome"][i]):  # quarantined at decode
                outcomes.append(batch["outcome"][i])
                final.append(True)
            else:
                row = _image_row({k: batch[k][i] for k in _ROW_FIELDS})
                if self.spec.finish is None:
                    outcomes.append(pickle.dumps(apply_stage(self.spec.name, row, rgb, self.process)))
                    final.append(True)
                else:
                    try:
                        outcomes.append(pickle.dumps(self.process(row, rgb)))
                        final.append(False)
                    except Exception as exc:  # one image's failure never stops the shard
                        outcomes.append(pickle.dumps(stage_error(row, exc)))
                        final.append(True)
            release_freed_memory()
            seconds.append(time.perf_counter() - t0)
        keep = ("image_id", "shard", "source", "sha256", "width", "height", "decode_s")
        return {
            **{k: batch[k] for k in keep},
            "h": np.array(heights),
            "w": np.array(widths),
            "outcome": np.array(outcomes, dtype=object),
            "final": np.array(final),
            "model_s": np.array(seconds),
        }


def post_process(
    row: dict[str, Any], name: str, finish: Callable[[ImageRow, Any], StageResult]
) -> dict[str, Any]:
    """The stage's CPU step (`StageSpec.finish`) on the actor's raw output, off the model actors.
    It takes the stage's name and step, not the whole spec: unpickling the spec's model and
    generator configs would import torch in every task worker Ray starts (~1 s each)."""
    t0 = time.perf_counter()
    if not row["final"]:
        image_row = _image_row({**row, "data": b""})
        try:
            result = finish(image_row, pickle.loads(row["outcome"]))
            outcome = check_result(name, image_row, (row["h"], row["w"], 3), result)
        except Exception as exc:
            outcome = stage_error(image_row, exc)
        row["outcome"], row["final"] = pickle.dumps(outcome), True
    row["post_s"] = time.perf_counter() - t0
    return row


_ROW_FIELDS = ("image_id", "source", "sha256", "width", "height", "shard", "data")


def _image_row(row: dict[str, Any]) -> ImageRow:
    return ImageRow(
        int(row["image_id"]),
        str(row["source"]),
        str(row["sha256"]),
        int(row["width"]),
        int(row["height"]),
        str(row["shard"]),
        bytes(row["data"]),
    )


def decoded_row_bytes(store: Store, shards: Iterable[str] | None = None) -> np.ndarray:
    """Bytes of each decoded row of `shards` (None: every shard) as the pipeline carries it: the
    encoded file (the row keeps it) plus its RGB pixels (capped by the store's max_pixels, as
    decoding does). Column arithmetic on the manifest: the driver reads it before every run, and
    at SA-1B's 11M images Python lists of its columns took 12 s and 2 GiB; one record batch (a
    manifest part's row group) at a time, so the int64 temporaries are a part's, not 11M rows'."""
    wanted = None if shards is None else pa.array(sorted(set(shards)), pa.string())
    out = [np.zeros(0, np.int64)]
    for batch in store.manifest_index().to_batches():
        encoded, width, height = (
            batch.column(name).to_numpy().astype(np.int64) for name in ("bytes", "width", "height")
        )
        rows = encoded + 3 * np.minimum(width * height, store.max_pixels)
        if wanted is not None:
            rows = rows[pc.is_in(batch.column("shard"), value_set=wanted).to_numpy(zero_copy_only=False)]
        out.append(rows)
    return np.concatenate(out)


# Blocks the embedded Ray's object store holds: Ray Data spends half the store on the blocks
# between its steps and reserves part of that for each step (read, decode, model, post), so
# every step keeps a couple of blocks queued.
OBJECT_STORE_BLOCKS = 32
MIN_OBJECT_STORE_MB = 128  # (Ray's own minimum is 75 MiB)


def object_store_mb(store: Store, config: RayConfig) -> int:
    """The embedded Ray's object store, MiB, when `ray.object_store_mb` is null: room for
    OBJECT_STORE_BLOCKS blocks of `ray.block_images` of the store's largest decoded rows.

    Not Ray's default (30% of the machine's memory): Ray's store never gives shared memory back
    while it runs, and a run touches more of it with each image it handles, up to the store's
    size (measured: 0.01, 0.05 and 0.19 GiB after 20, 200 and 1000 images on a 24 GiB machine);
    a store sized to the blocks in flight stops that growth early. Never more than Ray's default
    (huge photos on a small machine)."""
    rows = decoded_row_bytes(store)
    block = config.block_images * (int(rows.max()) if len(rows) else 0)
    sized = max(MIN_OBJECT_STORE_MB, math.ceil(OBJECT_STORE_BLOCKS * block / 2**20))
    ray_default = 0.3 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    return min(sized, max(MIN_OBJECT_STORE_MB, int(ray_default)))


def build_dataset(store: Store, spec: StageSpec, todo: dict[str, list[int]], plan: ActorPlan):
    """The Ray Data chain over the shards in `todo` (shard -> image ids already received)."""
    import ray

    items = [{"shard": s, "skip": json.dumps(sorted(skip))} for s, skip in todo.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # About `block_images` decoded images per block, not a shard's: a block is what Ray hands a
    # model actor, and whole shards left one actor working alone on the last ones. Ray sizes
    # blocks in bytes (a block ends once it exceeds the target: hence the half row less); this
    # sets it for this dataset only.
    sizes = decoded_row_bytes(store, todo)
    row = float(sizes.mean()) if len(sizes) else 0.0
    ds.context.target_max_block_size = max(1, round((plan.block_images - 0.5) * row))
    ds = (
        ds.flat_map(
            read_shard,
            fn_kwargs={"root": str(store.root)},
            compute=ray.data.TaskPoolStrategy(size=plan.read_tasks),
            num_cpus=plan.read_cpus,
        )
        .map(
            decode,
            fn_kwargs={"max_pixels": store.max_pixels, "min_side": store.min_side},
            num_cpus=plan.decode_cpus,
        )
        .map_batches(
            ModelActor,
            fn_constructor_kwargs={"spec": spec, "threads": plan.threads},
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                min_size=1,
                max_size=plan.actors,
                initial_size=plan.actors,
                # One block (`ray.block_images` images) per actor at a time: with Ray's default
                # of 4 the first actor ready takes every block of a small run while the others
                # idle (measured: 20 images, one of two actors busy, 0.47x the plain process's
                # throughput; 0.88x with 1).
                max_tasks_in_flight_per_actor=1,
            ),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
        )
    )
    if spec.finish is not None:
        ds = ds.map(
            post_process,
            fn_kwargs={"name": spec.name, "finish": spec.finish},
            num_cpus=plan.post_cpus,
        )
    return ds
