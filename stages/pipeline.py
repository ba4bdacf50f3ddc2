"""The generic shard pipeline every stage runs on Ray Data.

    pending shards -> read rows (sharding.Store) -> decode (CPU tasks) -> model actors
                   -> [post-processing (CPU tasks)] -> driver: collect per shard, commit

Ray has no job resume, so the driver owns exactly-once: it skips shards with a valid completion
record, collects each image's outcome once (deduplicated by image_id: a retried task may deliver
an image again), and commits a shard through `Store.write_shard_output` as soon as all of its
images have arrived. Ids are deterministic, so even a commit repeated by another run writes the
same bytes. If the pipeline fails (a lost node whose work Ray cannot rebuild, a crashed actor),
the driver starts it again over the unfinished shards only, without the images it already has.
The per-image rules (decode, quarantine, ids, frame checks) are `sharding.runner`'s, shared with
the single-process runner.

A stage may hand the driver more than its output: each image's `StageResult.extra` (e.g. a new
image embedding, megabytes) is spooled to a temporary file on the driver until its shard is
complete, then given to the stage's `commit` step together with the shard's output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from sharding.runner import (
    ImageOutcome,
    ProcessFn,
    StageResult,
    add_outcome,
    apply_stage,
    check_result,
    decode_row,
    pending_shards,
    stage_error,
)
from sharding.store import ImageRow, ShardOutput, Store, check_stage, utc_now
from stages.config import RayConfig
from stages.progress import Progress
from stages.resources import ActorPlan, plan_actors
from stages.spool import Spool

MAX_LISTED_QUARANTINE = 1000  # quarantined inputs listed in a run record (all are in the store)


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
    """

    name: str
    make: Callable[..., Callable[[ImageRow, np.ndarray], Any]]
    make_kwargs: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[ImageRow, Any], StageResult] | None = None
    uses_model: bool = True
    commit: Callable[..., dict[str, Any]] | None = None
    pending: Callable[[Store, int], list[str]] | None = None


# ---- the steps (module-level functions and one callable class, as Ray Data wants) ------------


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


def post_process(row: dict[str, Any], spec: StageSpec) -> dict[str, Any]:
    """The stage's CPU step (`spec.finish`) on the actor's raw output, off the model actors."""
    t0 = time.perf_counter()
    if not row["final"]:
        image_row = _image_row({**row, "data": b""})
        try:
            result = spec.finish(image_row, pickle.loads(row["outcome"]))
            outcome = check_result(spec.name, image_row, (row["h"], row["w"], 3), result)
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


def build_dataset(store: Store, spec: StageSpec, todo: dict[str, list[int]], plan: ActorPlan):
    """The Ray Data chain over the shards in `todo` (shard -> image ids to skip)."""
    import ray

    items = [{"shard": s, "skip": json.dumps(sorted(skip))} for s, skip in todo.items()]
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .flat_map(
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
                # One block (a shard's rows) per actor at a time: with Ray's default of 4 the
                # first actor ready takes every block of a small run while the others idle
                # (measured: 20 images, one of two actors busy, 0.47x the plain process's
                # throughput; 0.88x with 1).
                max_tasks_in_flight_per_actor=1,
            ),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
        )
    )
    if spec.finish is not None:
        ds = ds.map(post_process, fn_kwargs={"spec": spec}, num_cpus=plan.post_cpus)
    return ds


# ---- the driver ------------------------------------------------------------------------------


def write_output(
    store: Store, stage: str, round_: int, shard: str, output: ShardOutput, extras: Any = None
) -> dict[str, Any]:
    """The default commit step: the shard's output through `Store.write_shard_output`."""
    return store.write_shard_output(stage, round_, shard, output)


@dataclass
class _Run:
    """What the driver has collected so far (kept across pipeline attempts)."""

    expected: dict[str, int]
    received: dict[str, dict[int, ImageOutcome]] = field(default_factory=dict)
    spool: Spool = field(default_factory=Spool)
    committed: list[str] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    steps: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "model": 0.0, "post": 0.0, "commit": 0.0}
    )
    failures: list[dict[str, Any]] = field(default_factory=list)


def run_pipeline(
    store: Store,
    spec: StageSpec,
    round_: int,
    config: RayConfig,
    *,
    shards: list[str] | None = None,
    where: str = "",
    meta: dict[str, Any] | None = None,
    on_shard: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run `spec` over every pending shard of `store` (or the given ones) on the current Ray.

    Arguments:
      store (Store): the store; on a cluster it must be on storage every node sees.
      spec (StageSpec): the stage.
      round_ (int): outputs go to STORE/stages/<spec.name>/round-<round_>/.
      config (RayConfig): the `ray:` block.
      shards (list[str] | None): restrict to these shards.
      where (str): a description of the cluster, kept in the run record.
      meta (dict | None): stage facts for the run record (model, settings, detector weights).
      on_shard: called with (shard, completion record) after each commit, on the driver.
    Returns:
      (dict): the run record (also written to STORE/runs/<stage>/): shards skipped / committed /
        unfinished, images, annotations, quarantined inputs, failures, throughput, time per step.
    Raises:
      RuntimeError: shards are still unfinished after `config.max_attempts` attempts (the
        committed ones stay; a re-run does the rest).
    """
    import ray

    check_stage(spec.name, round_)
    started, t0 = utc_now(), time.perf_counter()
    known = store.shards()
    wanted = known if shards is None else list(shards)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"shards {unknown} are not in {store.root}: see `sa-engine status {store.root}`")
    pending = set(
        spec.pending(store, round_) if spec.pending else pending_shards(store, spec.name, round_)
    )
    todo = [s for s in wanted if s in pending]
    sizes = store.shard_images()
    run = _Run(expected={s: len(sizes[s]) for s in todo})
    plan = _plan(config, spec)
    record_path = store.root / "runs" / spec.name / (
        f"{started.replace(':', '')}-{os.getpid()}-round-{round_}.json"
    )
    base = {
        "stage": spec.name,
        "round": round_,
        "runner": "ray",
        "where": where,
        "started_at": started,
        "cluster": {
            k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")
        },
        "nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}),
        "plan": dataclasses.asdict(plan),
        "config": dataclasses.asdict(config),
        "skipped": [s for s in wanted if s not in pending],
        "record_path": str(record_path),
        "meta": meta or {},
    }
    progress = Progress(
        f"{spec.name} round {round_}", len(todo), sum(run.expected.values()), config.progress
    )
    _disable_ray_bars()
    attempts = 0
    while attempts < config.max_attempts and len(run.committed) < len(todo):
        attempts += 1
        left = {s: sorted(run.received.get(s, {})) for s in todo if s not in run.committed}
        try:
            if attempts > 1:  # size the pool from the nodes still alive
                plan = _plan(config, spec)
                base["plan"] = dataclasses.asdict(plan)
            ds = build_dataset(store, spec, left, plan)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if _collect(store, spec, round_, run, batch, progress, on_shard):
                    record = _record(base, run, todo, t0, "running", attempts)
                    store.write_run_record(spec.name, record, record_path)
            missing = [s for s in left if s not in run.committed]
            if missing:
                raise RuntimeError(f"the pipeline ended without every image of shards {missing}")
        except Exception as exc:  # a lost node, a dead actor: retry what is unfinished
            run.failures.append(
                {"attempt": attempts, "at": utc_now(), "error": f"{type(exc).__name__}: {exc}"[:2000]}
            )
    progress.close()
    run.spool.close()
    state = "finished" if len(run.committed) == len(todo) else "failed"
    record = _record(base, run, todo, t0, state, attempts)
    store.write_run_record(spec.name, record, record_path)
    if state == "failed":
        raise RuntimeError(
            f"{spec.name} round {round_}: {len(todo) - len(run.committed)} shard(s) unfinished after "
            f"{attempts} attempt(s); last error: {run.failures[-1]['error'][:500]}. Committed shards "
            f"stay; re-run the same command to do the rest (run record: {record_path})"
        )
    return record


def _collect(
    store: Store,
    spec: StageSpec,
    round_: int,
    run: _Run,
    batch: dict[str, np.ndarray],
    progress: Progress,
    on_shard: Callable[[str, dict[str, Any]], None] | None = None,
) -> bool:
    """Take a batch of image outcomes; commit every shard it completes. Returns: whether any
    shard was committed."""
    committed = False
    for i in range(len(batch["image_id"])):
        shard, image_id = str(batch["shard"][i]), int(batch["image_id"][i])
        got = run.received.setdefault(shard, {})
        if shard in run.committed or image_id in got:
            run.duplicates += 1
            continue
        outcome: ImageOutcome = pickle.loads(batch["outcome"][i])
        if outcome.extra is not None:
            run.spool.add(shard, image_id, outcome.extra)
            outcome.extra = None
        got[image_id] = outcome
        run.steps["decode"] += float(batch["decode_s"][i])
        run.steps["model"] += float(batch["model_s"][i])
        if "post_s" in batch:
            run.steps["post"] += float(batch["post_s"][i])
        progress.add_image(len(outcome.masks), outcome.quarantined is not None)
        if len(got) == run.expected[shard]:
            t0 = time.perf_counter()
            out = ShardOutput()
            for item in got.values():
                add_outcome(out, item)
            commit = spec.commit or write_output
            record = commit(store, spec.name, round_, shard, out, run.spool.extras(shard, got))
            run.spool.drop(shard)
            run.steps["commit"] += time.perf_counter() - t0
            run.committed.append(shard)
            run.images += record["counts"]["images"]
            run.annotations += record["counts"]["annotations"]
            run.quarantined += [{**q, "shard": shard} for q in record["quarantined"]]
            del run.received[shard]
            progress.add_shard()
            committed = True
            if on_shard is not None:
                on_shard(shard, record)
    return committed


def _record(
    base: dict[str, Any], run: _Run, todo: list[str], t0: float, state: str, attempts: int = 0
) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    return {
        **base,
        "state": state,
        "finished_at": utc_now() if state != "running" else None,
        "processed": list(run.committed),
        "unfinished": [s for s in todo if s not in run.committed],
        "images": run.images,
        "annotations": run.annotations,
        "quarantined": len(run.quarantined),
        "quarantined_inputs": [
            {k: q.get(k) for k in ("shard", "image_id", "source", "reason", "detail")}
            for q in run.quarantined[:MAX_LISTED_QUARANTINE]
        ],
        "attempts": attempts,
        "failures": run.failures,
        "duplicates_dropped": run.duplicates,
        "seconds": seconds,
        "throughput": {
            "images_per_s": run.images / seconds if seconds else 0.0,
            "masks_per_s": run.annotations / seconds if seconds else 0.0,
        },
        "step_seconds": {"wall": seconds, **{k: round(v, 4) for k, v in run.steps.items()}},
    }


def _plan(config: RayConfig, spec: StageSpec) -> ActorPlan:
    import ray

    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return plan_actors(ray.cluster_resources(), config, spec.uses_model, node_cpus=nodes)


def _disable_ray_bars() -> None:
    """Ray Data's own per-operator bars would interleave with the stage's bar."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
