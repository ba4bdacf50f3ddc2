"""SA-1B export on a Ray cluster: one task per shard writes its tar and its record.

    shards -> export_shard (re-check the shard's outputs, resize, encode, write the tar: CPU tasks)
    driver: MEMBERS.tsv, SHA256SUMS and release.json from the tars' records, in shard order

At SA-1B's scale a release is ~1000 tars of ~11 GB and ~100 images/s a core to resize and encode:
about 30 hours on one core, spread over the cluster here. Each task writes its files atomically
and decides from the store and the folder alone, so Ray's retries (a lost node) write the same
bytes, and a re-run keeps the tars already written (`sharding.export_sa1b.export_shard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sharding.export_sa1b import ShardOutcome, export_shard
from sharding.store import Store
from stages.cluster import shard_tasks


@dataclass
class RayExport:
    """`sharding.export_sa1b.ExportCluster` on the Ray this process is connected to; cpus: CPUs
    one shard's task reserves (checked as `sharding.export_sa1b.ExportConfig`'s)."""

    cpus: float = 1.0

    def export_shards(
        self, store: Store, out_dir: Path, shards: list[str], source: tuple, allow_partial: bool
    ) -> Iterator[ShardOutcome]:
        kwargs = {"root": str(store.root), "out": str(out_dir), "source": list(source),
                  "allow_partial": allow_partial}  # fmt: skip
        for row in shard_tasks(shards, _export_row, kwargs, self.cpus):
            yield row["status"], row["value"]


def _export_row(
    row: dict[str, Any], root: str, out: str, source: list, allow_partial: bool
) -> dict[str, Any]:
    try:
        status, value = export_shard(Store(root), Path(out), row["shard"], tuple(source), allow_partial)
    except ValueError as err:
        return {"shard": row["shard"], "status": "", "value": "", "error": str(err)}
    return {"shard": row["shard"], "status": status, "value": value, "error": ""}
