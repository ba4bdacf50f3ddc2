"""Shards, the store, resume and release export: every stage reads and writes only through here.

- `sources`: list a folder / glob / list file / fsspec URI.
- `manifest.ingest`: validate, deduplicate, give stable ids, cut new images into new shards
  (`IngestConfig`: the `ingest:` block; on Ray through `stages.ingest.RayIngest`).
- `store.Store`: the store layout (see its docstring), shard reading, atomic shard outputs with
  completion records, the quarantine table.
- `runner.run_stage` / `process_shard`: the stage-agnostic runner (skip done, redo incomplete).
- `export_sa1b`, `export_coco`, `verify`: releases and their checksums (`ExportConfig`: the
  `export:` block; SA-1B tars on Ray through `stages.export.RayExport`); `status`: progress.
"""

from sharding.manifest import IngestConfig, IngestReport, ingest
from sharding.runner import StageResult, annotation_id, pending_shards, process_shard, run_stage
from sharding.store import PRIVACY_STAGE, ImageRow, ShardOutput, Store

__all__ = [
    "IngestConfig",
    "IngestReport",
    "ingest",
    "StageResult",
    "annotation_id",
    "pending_shards",
    "process_shard",
    "run_stage",
    "PRIVACY_STAGE",
    "ImageRow",
    "ShardOutput",
    "Store",
]
