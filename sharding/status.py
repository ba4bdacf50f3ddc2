"""Progress of a store: what was ingested and, per stage and round, how far it got."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.compute as pc

from sharding.store import Store


@dataclass
class StageProgress:
    stage: str
    round: int
    shards_done: int
    shards_total: int
    images: int
    annotations: int
    output_images: int
    quarantined: int
    set_aside: int = 0  # shards whose record was set aside (an output failed its sha256)


def stage_progress(store: Store, check: str = "size") -> list[StageProgress]:
    """One entry per (stage, round) folder; a shard counts only if its completion record is valid
    (`check`: "sha256" re-hashes every output, "size" only compares sizes)."""
    shards = store.shards()
    out = []
    for stage, round_ in store.stage_rounds():
        progress = StageProgress(stage, round_, 0, len(shards), 0, 0, 0, 0)
        for shard in shards:
            record = store.done_record(stage, round_, shard, check)
            if record is None:
                progress.set_aside += store.set_aside_path(stage, round_, shard).is_file()
                continue
            progress.shards_done += 1
            progress.images += record["counts"]["images"]
            progress.annotations += record["counts"]["annotations"]
            progress.output_images += record["counts"]["output_images"]
            progress.quarantined += record["counts"]["quarantined"]
        out.append(progress)
    return out


def ingest_state(store: Store) -> list[str]:
    """A line when an ingest is running now, or when the last one stopped before its end."""
    holder = store.ingest_holder()
    if holder is not None:
        return [f"ingest running ({holder}): what it has committed so far is counted above"]
    last = store.last_run_record("ingest")
    if last is None or last.get("finished_at") is not None or "started_at" not in last:
        return []
    flags = f"--shard-size {last['shard_size']}" + (
        f" --commit-shards {last['commit_shards']}" if last.get("commit_shards") else ""
    )
    return [
        f"the last ingest, of {last['source']} (started {last['started_at']}), stopped after "
        f"committing {last['added']} images in {len(last['shards_added'])} shards: run "
        f"`sa-engine ingest {last['source']} --store {store.root} {flags}` again to go on"
    ]


def status_lines(store: Store, check: str = "size") -> list[str]:
    manifest = store.manifest_index()
    lines = [
        f"store {store.root}: {manifest.num_rows} images in "
        f"{pc.count_distinct(manifest.column('shard')).as_py()} shards, "
        f"{store.duplicates().num_rows} duplicates recorded, "
        f"{store.ingest_quarantine().num_rows} quarantined at ingest",
    ]
    lines += ingest_state(store)
    for p in stage_progress(store, check):
        line = (
            f"{p.stage} round {p.round}: {p.shards_done}/{p.shards_total} shards done, {p.images} images, "
            f"{p.annotations} annotations, {p.quarantined} quarantined"
        )
        if p.output_images:
            line += f", {p.output_images} output images"
        if p.set_aside:
            line += f", {p.set_aside} set aside (an output failed its sha256 check: `run` redoes them)"
        lines.append(line)
    reasons = store.quarantine().column("reason").to_pylist()
    if reasons:
        counts = {r: reasons.count(r) for r in sorted(set(reasons))}
        lines.append("quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return lines
