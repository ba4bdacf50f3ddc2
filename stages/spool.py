"""The driver's spool: what the stage hands over besides each image's output (`StageResult.extra`,
e.g. a new image embedding of megabytes), kept in a temporary file per shard until the shard is
complete and committed."""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator


class Spool:
    """The `StageResult.extra` of the images received, one temporary file per shard in flight
    (a shard's image embeddings would not fit the driver's memory)."""

    def __init__(self) -> None:
        self.files: dict[str, Any] = {}
        self.index: dict[str, dict[int, tuple[int, int]]] = {}

    def add(self, shard: str, image_id: int, extra: Any) -> None:
        if shard not in self.files:
            self.files[shard] = tempfile.TemporaryFile(prefix="sa-engine-spool-")
            self.index[shard] = {}
        handle, data = self.files[shard], pickle.dumps(extra, protocol=pickle.HIGHEST_PROTOCOL)
        handle.seek(0, os.SEEK_END)
        self.index[shard][image_id] = (handle.tell(), len(data))
        handle.write(data)

    def extras(self, shard: str, image_ids: Iterable[int]) -> "ShardExtras":
        return ShardExtras(self, shard, sorted(image_ids))

    def load(self, shard: str, image_id: int) -> Any:
        where = self.index.get(shard, {}).get(image_id)
        if where is None:
            return None
        handle = self.files[shard]
        handle.seek(where[0])
        return pickle.loads(handle.read(where[1]))

    def drop(self, shard: str) -> None:
        handle = self.files.pop(shard, None)
        self.index.pop(shard, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        for shard in list(self.files):
            self.drop(shard)


@dataclass
class ShardExtras:
    """`(image_id, extra or None)` of one shard in image_id order; each iteration reads the
    spool again."""

    spool: Spool
    shard: str
    image_ids: list[int]

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for image_id in self.image_ids:
            yield image_id, self.spool.load(self.shard, image_id)
