"""Progress of a store: what was ingested and, per stage and round, how far it got."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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


def ingest_state(store: Store) -> dict[str, Any]:
    """The ingest running now ({"running": holder}), or the last one when it stopped before its
    end ({"stopped": what it committed, "resume": the command that goes on}); else {}."""
    holder = store.ingest_holder()
    if holder is not None:
        return {"running": str(holder)}
    last = store.last_run_record("ingest")
    if last is None or last.get("finished_at") is not None or "started_at" not in last:
        return {}
    flags = f"--shard-size {last['shard_size']}" + (
        f" --commit-shards {last['commit_shards']}" if last.get("commit_shards") else ""
    )
    return {
        "stopped": {
            "source": last["source"],
            "started_at": last["started_at"],
            "added": last["added"],
            "shards_added": len(last["shards_added"]),
        },
        "resume": f"sa-engine ingest {last['source']} --store {store.root} {flags}",
    }


def last_run(store: Store, stage: str, round_: int) -> dict[str, Any] | None:
    """The newest batch run of a stage round (None before the first): its record, start and
    state; a record that still says `running` is `running` while its process holds the run's lock
    (`Store.running`; `holder` names it) and `interrupted` once that process has ended without
    writing its end (killed, or its machine lost); a failed run's last error."""
    found = store.last_stage_run(stage, round_)
    if found is None:
        return None
    path, record = found
    out = {
        "record": str(path.relative_to(store.root)),
        "started_at": record.get("started_at"),
        "state": record.get("state", "unknown"),
    }
    if out["state"] == "running":
        holder = store.run_holder(path)
        if holder is None:
            out["state"] = "interrupted"
        else:
            out["holder"] = holder
    elif out["state"] == "failed":
        failures = record.get("failures") or [{}]
        error = record.get("error") or failures[-1].get("error") or ""
        out["error"] = error.splitlines()[0] if error else ""
    return out


# quarantined inputs `sa-engine status` prints one by one (`--quarantine`: all of them)
LISTED_QUARANTINE = 10


def store_status(store: Store, check: str = "size") -> dict[str, Any]:
    """The store's progress as data (`sa-engine status --json`): what was ingested, the ingest
    running or stopped, per stage and round the shards done (`complete` when all are), the
    shards the annotation tool's sessions hold now, and every quarantined input (where it was
    skipped, its source, sha256, reason and detail)."""
    manifest = store.manifest_index()
    quarantine = store.quarantine().to_pylist()
    reasons = [q["reason"] for q in quarantine]
    stages = []
    for p in stage_progress(store, check):
        stages.append({
            **asdict(p),
            "complete": p.shards_done == p.shards_total,
            "last_run": last_run(store, p.stage, p.round),
        })  # fmt: skip
    return {
        "store": str(store.root),
        "images": manifest.num_rows,
        "shards": pc.count_distinct(manifest.column("shard")).as_py(),
        "duplicates": store.duplicates().num_rows,
        "quarantined_at_ingest": store.ingest_quarantine().num_rows,
        "ingest": ingest_state(store),
        "stages": stages,
        "sessions": store.leases(),
        "quarantine_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
        "quarantine": quarantine,
        # (with --verify, "sha256": every shard file's footer and image count too)
        **({"damaged_shards": store.damaged_shards()} if check == "sha256" else {}),
    }


def status_lines(store: Store, check: str = "size", listed: int | None = LISTED_QUARANTINE) -> list[str]:
    """`sa-engine status`'s lines; listed: quarantined inputs shown one by one (None: all)."""
    return format_status(store_status(store, check), listed)


def format_status(status: dict[str, Any], listed: int | None = LISTED_QUARANTINE) -> list[str]:
    """`store_status`'s data as `sa-engine status` prints it."""
    lines = [
        f"store {status['store']}: {status['images']} images in {status['shards']} shards, "
        f"{status['duplicates']} duplicates recorded, "
        f"{status['quarantined_at_ingest']} quarantined at ingest",
    ]
    for shard, problem in status.get("damaged_shards", {}).items():
        lines.append(f"DAMAGED {shard}: {problem}")
    ingest = status["ingest"]
    if "running" in ingest:
        lines.append(f"ingest running ({ingest['running']}): what it has committed so far is counted above")
    elif ingest:
        last = ingest["stopped"]
        lines.append(
            f"the last ingest, of {last['source']} (started {last['started_at']}), stopped after "
            f"committing {last['added']} images in {last['shards_added']} shards: run "
            f"`{ingest['resume']}` again to go on"
        )
    for p in status["stages"]:
        line = (
            f"{p['stage']} round {p['round']}: {p['shards_done']}/{p['shards_total']} shards done, "
            f"{p['images']} images, {p['annotations']} annotations, {p['quarantined']} quarantined"
        )
        if p["output_images"]:
            line += f", {p['output_images']} output images"
        if p["set_aside"]:
            line += f", {p['set_aside']} set aside (an output failed its sha256 check: `run` redoes them)"
        lines.append(line)
        run = p.get("last_run")
        if run is not None and run["state"] != "finished":
            lines.append("  " + _run_line(p["stage"], run, p["complete"]))
    held: dict[tuple[str, int, str], list[str]] = {}
    for lease in status["sessions"]:
        held.setdefault((lease["stage"], lease["round"], lease["holder"]), []).append(lease["shard"])
    for (stage, round_, holder), shards in held.items():
        lines.append(
            f"{stage} round {round_}: an annotation session ({holder}) holds {len(shards)} shard(s): "
            + ", ".join(shards)
        )
    if status["quarantine_reasons"]:
        counts = status["quarantine_reasons"]
        lines.append("quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    shown = status["quarantine"] if listed is None else status["quarantine"][:listed]
    for q in shown:
        where = "ingest" if q["stage"] == "ingest" else f"{q['stage']} round {q['round']}"
        shard = f", shard {q['shard']}" if q["shard"] else ""
        lines.append(
            f"  quarantined ({where}{shard}) {_one_line(q['source'])}: {q['reason']} "
            f"({_one_line(q['detail'])})"
            + (f" sha256 {q['sha256']}" if q["sha256"] else "")
        )
    if len(shown) < len(status["quarantine"]):
        lines.append(
            f"  ... and {len(status['quarantine']) - len(shown)} more: "
            f"`sa-engine status {status['store']} --quarantine` lists every one"
        )
    return lines


def _run_line(stage: str, run: dict[str, Any], complete: bool) -> str:
    """What `status` says of a stage round's last run when it did not finish."""
    started = f"started {run['started_at']}, record {run['record']}"
    if run["state"] == "running":
        return f"a run is going on ({run['holder']}; {started})"
    said = {
        "interrupted": "ended without finishing: its process was killed or its machine lost",
        "stopped": "was stopped (Ctrl-C or SIGTERM)",
        "failed": "failed" + (f": {run['error']}" if run.get("error") else ""),
    }.get(run["state"], f"says {run['state']!r}")
    then = "" if complete else (
        f"; committed shards stay: the same `sa-engine run {stage}` command does the rest"
    )
    return f"the last run ({started}) {said}{then}"


def _one_line(text: str) -> str:
    """`text` with its control characters escaped (a file name may hold a newline), so that
    each entry stays on its own line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
