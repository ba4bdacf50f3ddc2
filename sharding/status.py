"""Progress of a store: what was ingested and, per stage and round, how far it got."""

from __future__ import annotations

from dataclasses import dataclass

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


def status_lines(store: Store, check: str = "size") -> list[str]:
    manifest = store.manifest_index()
    lines = [
        f"store {store.root}: {manifest.num_rows} images in {len(store.shards())} shards, "
        f"{store.duplicates().num_rows} duplicates recorded, "
        f"{store.ingest_quarantine().num_rows} quarantined at ingest",
    ]
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
