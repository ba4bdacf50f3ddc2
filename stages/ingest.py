"""Ingest on a Ray cluster: the per-file work and the shard writing as Ray Data pipelines.

    listed URIs -> chunks -> scan (read, sha256, decode-validate: CPU tasks) -> driver, in order
    driver: dedupe, number, quarantine, stream the manifest part (`sharding.manifest.ingest`)
    new shards -> write (re-read each source, check its sha256, write the shard: CPU tasks)
    driver: commit the manifest part

Only a summary of each file (sha256, size, decode verdict) reaches the driver; the bytes go from
the source to the shard on the worker that writes it, so an ingest of SA-1B's ~11 TB never
passes through one machine. Every task is pure or writes one file atomically, so Ray's retries
(a lost node) redo work without changing the result; nothing is visible before the commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sharding.manifest import FileCheck, FileRead, write_planned_shard
from sharding.store import Store
from stages.cluster import quiet_and_ordered, shard_rows

_COLUMNS = ("sha", "size", "reason", "detail", "mode", "rotated", "width", "height")
# Scan tasks of one ingest, at most: Ray Data's cost per block in the driver (~3 ms to make it,
# ~10 ms to run it on 2 CPUs: 4096 blocks took 12 + 44 s here, 1000 took 3 + 3 s) would otherwise
# grow with the listing; a longer listing gets larger chunks (11M files: ~5,400 a task).
MAX_SCAN_TASKS = 2048


@dataclass
class RayIngest:
    """`sharding.manifest.IngestCluster` on the Ray this process is connected to.

    chunk: files one scan task reads (a few seconds of work: small enough to spread a listing
      over every CPU and to lose little when a node goes, large enough that Ray's per-task cost
      stays small), or more where the listing would need over `MAX_SCAN_TASKS` tasks.
    cpus: CPUs one scan or shard-writing task reserves. (Both are checked as
      `sharding.IngestConfig`'s.)
    """

    chunk: int = 64
    cpus: float = 1.0

    def scan(self, uris: list[str], check: FileCheck) -> Iterator[FileRead]:
        import pyarrow as pa
        import ray

        if not uris:
            return
        quiet_and_ordered()
        size = max(self.chunk, -(-len(uris) // MAX_SCAN_TASKS))
        chunks = [pa.table({"uri": uris[i : i + size]}) for i in range(0, len(uris), size)]
        ds = ray.data.from_arrow(chunks).map_batches(
            _scan_batch,
            fn_kwargs={"check": check},
            batch_size=size,
            batch_format="pyarrow",
            num_cpus=self.cpus,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            columns = {name: batch.column(name).to_pylist() for name in _COLUMNS}
            for i in range(batch.num_rows):
                yield _read(*(columns[name][i] for name in _COLUMNS))

    def write_shards(self, store: Store, plan: Path, shards: list[str]) -> None:
        # each task writes its shard's file; a source gone or changed comes back as its message,
        # and every shard is tried before the first is raised, with how many more failed
        kwargs = {"root": str(store.root), "plan": str(plan)}
        rows = shard_rows(shards, _write_row, kwargs, self.cpus)
        errors = [row["error"] for row in rows if row["error"]]
        if len(errors) > 1:
            errors[0] += f" (and {len(errors) - 1} more shard(s) like it)"
        if errors:
            raise ValueError(errors[0])


def _scan_batch(batch: Any, check: FileCheck) -> Any:
    """A chunk of URIs -> their `FileRead` summaries (without bytes), as Arrow columns."""
    import pyarrow as pa

    reads = [check(uri) for uri in batch.column("uri").to_pylist()]
    info = [r.info for r in reads]
    return pa.table(
        {
            "sha": [r.sha for r in reads],
            "size": pa.array([r.size for r in reads], pa.int64()),
            "reason": [r.reason for r in reads],
            "detail": [r.detail for r in reads],
            "mode": pa.array([i and i.original_mode for i in info], pa.string()),
            "rotated": pa.array([i and i.exif_rotated for i in info], pa.bool_()),
            "width": pa.array([i and i.width for i in info], pa.int64()),
            "height": pa.array([i and i.height for i in info], pa.int64()),
        }
    )


def _read(sha, size, reason, detail, mode, rotated, width, height) -> FileRead:
    from engine.image_io import ImageInfo

    info = None if mode is None else ImageInfo(mode, bool(rotated), int(width), int(height))
    return FileRead(sha, int(size), None, info, reason, detail)


def _write_row(row: dict[str, Any], root: str, plan: str) -> dict[str, Any]:
    try:
        write_planned_shard(Store(root), Path(plan), row["shard"])
    except ValueError as err:
        return {"shard": row["shard"], "error": str(err)}
    return {"shard": row["shard"], "error": ""}
