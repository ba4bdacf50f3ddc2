"""The quality report on a Ray cluster: one task per shard counts its figures (`engine.quality`).

    shards -> shard_tally (read the shard's annotation table, compare its masks, measure
              concavities: CPU tasks)
    driver: the tallies summed in shard order, the rows

At SA-1B's scale (11M images, ~100 masks each) one process takes hours; the tasks share the
cluster. The figures are the one-process report's, to the last bit: a tally is a sum, and the
driver adds them in the same order.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from engine.quality import QualityConfig, Tally, shard_tally
from sharding.store import Store
from stages.cluster import shard_tasks


@dataclass
class RayQuality:
    """`engine.quality.QualityCluster` on the Ray this process is connected to; cpus: CPUs one
    shard's task reserves."""

    cpus: float = 1.0

    def shard_tallies(
        self, store: Store, stage: str, round_: int, shards: list[str], config: QualityConfig
    ) -> Iterator[Tally]:
        kwargs = {"root": str(store.root), "stage": stage, "round_": round_, "config": asdict(config)}
        for row in shard_tasks(shards, _tally_row, kwargs, self.cpus):
            yield pickle.loads(row["tally"])


def _tally_row(row: dict[str, Any], root: str, stage: str, round_: int, config: dict) -> dict[str, Any]:
    try:
        tally = shard_tally(Store(root), stage, round_, row["shard"], QualityConfig(**config))
    except ValueError as err:
        return {"shard": row["shard"], "tally": b"", "error": str(err)}
    return {"shard": row["shard"], "tally": pickle.dumps(tally), "error": ""}
