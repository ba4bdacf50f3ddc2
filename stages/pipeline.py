"""The generic shard pipeline every stage runs on Ray Data, and its driver.

    pending shards -> read rows (sharding.Store) -> decode (CPU tasks) -> model actors
                   -> [post-processing (CPU tasks)] -> driver: collect per shard, commit

Ray has no job resume, so the driver owns exactly-once: it skips shards with a valid completion
record, collects each image's outcome once (deduplicated by image_id: a retried task may deliver
an image again), and commits a shard through `Store.write_shard_output` as soon as all of its
images have arrived. Ids are deterministic, so even a commit repeated by another run writes the
same bytes. If the pipeline fails (a lost node whose work Ray cannot rebuild, a crashed actor),
the driver starts it again over the unfinished shards only, without the images it already has.
The steps themselves and `StageSpec` are `stages.steps`; the per-image rules (decode, quarantine,
ids, frame checks) are `sharding.runner`'s, shared with the single-process runner.

A stage may hand the driver more than its output: each image's `StageResult.extra` (e.g. a new
image embedding, megabytes) is spooled to a temporary file on the driver until its shard is
complete, then given to the stage's `commit` step together with the shard's output.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.damaged import DamagedFile
from sharding.runner import ImageOutcome, add_outcome, pending_shards
from sharding.store import ShardOutput, Store, check_stage, utc_now
from stages.config import RayConfig
from stages.progress import Progress
from stages.resources import ActorPlan, plan_actors
from stages.spool import Spool
from stages.steps import StageSpec, build_dataset

MAX_LISTED_QUARANTINE = 1000  # quarantined inputs listed in a run record (all are in the store)


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
      ValueError: another batch run of a stage people share holds its round.
    """
    check_stage(spec.name, round_)
    if shards is not None:
        store.check_shards(shards)
    if not spec.shared_with_people:
        return _run_pipeline(store, spec, round_, config, shards, where, meta, on_shard, set())
    batch = store.hold_batch_run(spec.name, round_)  # first, then the sessions' leases: see there
    try:
        held = {h["shard"] for h in store.leases() if (h["stage"], h["round"]) == (spec.name, round_)}
        return _run_pipeline(store, spec, round_, config, shards, where, meta, on_shard, held)
    finally:
        batch.release()


def _run_pipeline(
    store: Store,
    spec: StageSpec,
    round_: int,
    config: RayConfig,
    shards: list[str] | None,
    where: str,
    meta: dict[str, Any] | None,
    on_shard: Callable[[str, dict[str, Any]], None] | None,
    held: set[str],
) -> dict[str, Any]:
    """`run_pipeline`'s work; `held`: shards people's annotation sessions hold (left alone)."""
    import ray

    started, t0 = utc_now(), time.perf_counter()
    wanted = store.shards() if shards is None else list(shards)
    pending = set(
        spec.pending(store, round_) if spec.pending else pending_shards(store, spec.name, round_)
    )
    todo = [s for s in wanted if s in pending and s not in held]
    sizes = store.shard_sizes()
    run = _Run(expected={s: sizes[s] for s in todo})
    plan = _plan(config, spec)
    record_path = store.run_record_path(spec.name, started, round_)
    base = {
        "stage": spec.name,
        "round": round_,
        "runner": "ray",
        "where": where,
        "started_at": started,
        "cluster": {
            k: v
            for k, v in ray.cluster_resources().items()
            if k in ("CPU", "GPU", "memory", "object_store_memory")
        },
        "nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}),
        "plan": dataclasses.asdict(plan),
        "config": dataclasses.asdict(config),
        "skipped": [s for s in wanted if s not in pending],
        "held_by_sessions": [s for s in wanted if s in pending and s in held],
        "record_path": str(record_path),
        "meta": meta or {},
    }
    with store.running(record_path):  # `status` tells a killed run from one going on
        progress = Progress(
            f"{spec.name} round {round_}", len(todo), sum(run.expected.values()), config.progress
        )
        _disable_ray_bars()
        attempts = 0

        def end(state: str) -> dict[str, Any]:
            """Close the run's progress and spool; write its last record."""
            progress.close()
            run.spool.close()
            record = _record(base, run, todo, t0, state, attempts)
            store.write_run_record(spec.name, record, record_path)
            return record

        try:
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
                    damaged = damaged_file(exc)
                    if damaged is not None:  # another attempt would read the same bytes
                        run.failures.append(
                            {"attempt": attempts, "at": utc_now(), "error": damaged,
                             "start_failed_again": False, "damaged": True}  # fmt: skip
                        )
                        break
                    start_error = construction_error(exc)
                    error = (start_error or f"{type(exc).__name__}: {exc}")[:2000]
                    # an actor that cannot start twice alike (a checkpoint that does not fit, a device
                    # that is absent) would fail every later attempt the same way
                    again = (
                        start_error is not None and bool(run.failures) and run.failures[-1]["error"] == error
                    )
                    run.failures.append(
                        {"attempt": attempts, "at": utc_now(), "error": error, "start_failed_again": again}
                    )
                    if again:
                        break
        except KeyboardInterrupt:  # Ctrl-C: committed shards stay; the record says it stopped
            end("stopped")
            raise
        state = "finished" if len(run.committed) == len(todo) else "failed"
        record = end(state)
        if state == "failed" and run.failures[-1].get("damaged"):
            raise DamagedFile(
                f"{spec.name} round {round_}: {run.failures[-1]['error']}. Not tried again; "
                f"{len(run.committed)} shard(s) committed; the other shards run without it with "
                f"--shard (run record: {record_path})"
            )
        if state == "failed" and run.failures[-1]["start_failed_again"]:
            raise RuntimeError(
                f"{spec.name} round {round_}: the model actors could not start, twice alike: "
                f"{run.failures[-1]['error']}. Not tried again; {len(run.committed)} shard(s) "
                f"committed. Fix what it names and re-run (run record: {record_path})"
            )
        if state == "failed":
            raise RuntimeError(
                f"{spec.name} round {round_}: {len(todo) - len(run.committed)} shard(s) unfinished after "
                f"{attempts} attempt(s); last error: {run.failures[-1]['error'][:500]}. Committed shards "
                f"stay; re-run the same command to do the rest (run record: {record_path})"
            )
        return record


def damaged_file(exc: BaseException) -> str | None:
    """The message of a `DamagedFile` a task raised (a shard file cut short), wherever Ray
    wrapped it; None for any other error."""
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayTaskError) and isinstance(exc.cause, DamagedFile):
            return str(exc.cause).splitlines()[0]  # (Ray Data adds lines of its retry advice)
        if isinstance(exc, DamagedFile) and not isinstance(exc, RayTaskError):
            return str(exc).splitlines()[0]
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def construction_error(exc: BaseException) -> str | None:
    """The error a stage's actor raised while starting (its model did not load: a checkpoint
    that does not fit, a device that is absent), as its one line, e.g.
    "CheckpointMismatchError: checkpoint ... does not fit vit_b ..."; None for anything else
    (a lost node, an actor that died while working), which a new attempt may get past."""
    from ray.exceptions import RayActorError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayActorError) and getattr(exc, "actor_init_failed", False):
            return _last_exception_line(str(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _last_exception_line(traceback_text: str) -> str:
    """"pkg.module.SomeError: message" -> "SomeError: message": the last line of a traceback that
    names an exception (Ray's colour codes removed)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in traceback_text.splitlines()]
    pattern = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit)): (.*)$")
    for line in reversed(lines):
        found = pattern.match(line)
        if found:
            return f"{found.group(1)}: {found.group(2)}"
    return next((line for line in reversed(lines) if line), traceback_text)


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
