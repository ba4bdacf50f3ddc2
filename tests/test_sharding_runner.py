"""The shard runner: deterministic ids, skip finished shards, redo incomplete ones, survive SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import rle
from sharding.manifest import ingest
from sharding.runner import annotation_id, pending_shards, run_stage
from sharding.status import last_run, stage_progress, status_lines
from sharding.store import Store
from store_helpers import blur_stage, classical_stage, synthetic_photos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo_store(tmp_path, demo_photos):
    store = Store.create(tmp_path / "store")
    ingest(str(demo_photos[0].parent), store, shard_size=2)
    return store


def test_ids_are_deterministic_and_unique(demo_store):
    report = run_stage(demo_store, "classical", 0, classical_stage)
    assert report.processed == ["shard-000000", "shard-000001"] and report.annotations > 0
    ids = []
    for shard in demo_store.shards():
        table = demo_store.read_annotations("classical", 0, shard)
        for image_id, ann_id in zip(
            table.column("image_id").to_pylist(), table.column("id").to_pylist()
        ):
            assert image_id == ann_id // 65536
        ids += table.column("id").to_pylist()
        masks = rle.decode(
            [
                {"size": s, "counts": c}
                for s, c in zip(
                    table.column("rle_size").to_pylist()[:3],
                    table.column("rle_counts").to_pylist()[:3],
                )
            ]
        )
        assert masks.dtype == bool and masks.any()
    assert len(ids) == len(set(ids)) and annotation_id(1, 0) in ids and max(ids) < 2**53
    assert set(table.column("stage").to_pylist()) == {"classical"}
    again = run_stage(demo_store, "classical", 0, classical_stage)
    assert again.skipped == demo_store.shards() and again.processed == []
    with pytest.raises(ValueError, match="65536"):
        annotation_id(5, 65536)


def test_incomplete_or_corrupt_outputs_are_redone(demo_store):
    """A shard without its record is redone by the next run; one whose file changed after its
    commit (same size) is found by the sha256 check of `status` or an export, which sets its
    record aside, and then redone: runs compare sizes only (re-hashing every output at each
    run's start does not scale)."""
    run_stage(demo_store, "classical", 0, classical_stage)
    folder = demo_store.stage_dir("classical", 0)
    reference = {p.name: p.read_bytes() for p in folder.glob("*.parquet")}
    (folder / "shard-000000.done.json").unlink()  # output without completion record
    data = bytearray((folder / "shard-000001.annotations.parquet").read_bytes())
    data[100] ^= 0xFF  # output that no longer matches its record
    (folder / "shard-000001.annotations.parquet").write_bytes(bytes(data))
    assert pending_shards(demo_store, "classical", 0) == ["shard-000000"]  # sizes match
    assert stage_progress(demo_store)[0].shards_done == 1  # the quick look (sizes), the default
    progress = stage_progress(demo_store, check="sha256")[0]  # finds it, sets its record aside
    assert (progress.shards_done, progress.set_aside) == (0, 1)
    assert (folder / "shard-000001.done.json.corrupt").is_file()
    assert not (folder / "shard-000001.done.json").exists()
    assert "1 set aside" in status_lines(demo_store)[1]  # (the quick look counts set-asides)
    assert pending_shards(demo_store, "classical", 0) == ["shard-000000", "shard-000001"]
    report = run_stage(demo_store, "classical", 0, classical_stage)
    assert report.processed == ["shard-000000", "shard-000001"]
    assert {p.name: p.read_bytes() for p in folder.glob("*.parquet")} == reference
    assert pending_shards(demo_store, "classical", 0) == []
    assert not list(folder.glob("*.corrupt"))  # the redo removed it
    assert stage_progress(demo_store, check="sha256")[0].shards_done == 2


def test_write_shard_images_api_and_status(demo_store):
    shard = "shard-000000"
    from engine.image_io import load_image

    images, meta = {}, {}
    for row in demo_store.iter_shard(shard):
        result = blur_stage(row, load_image(row.data))
        images[row.image_id], meta[row.image_id] = result.image, result.meta
    record = demo_store.write_shard_images("privacy", 0, shard, images, meta)
    assert record["counts"]["output_images"] == 2 and record["images"] == [1, 2]
    out = list(demo_store.iter_output_images("privacy", 0, shard))
    assert [(i, m) for i, _, m in out] == [
        (1, {"faces": 0, "plates": 0}),
        (2, {"faces": 0, "plates": 0}),
    ]
    assert out[0][1] == images[1]
    progress = stage_progress(demo_store)[0]
    assert (
        progress.stage,
        progress.shards_done,
        progress.shards_total,
        progress.output_images,
    ) == ("privacy", 1, 2, 2)


_KILLABLE = """
import sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from sharding.runner import run_stage
from sharding.store import Store
from store_helpers import classical_stage

def slow(row, rgb):
    time.sleep(0.12)
    return classical_stage(row, rgb)

run_stage(Store(sys.argv[1]), "classical", 0, slow)
"""


def _outputs(store):
    folder = store.stage_dir("classical", 0)
    tables = {
        p.name: store.read_annotations("classical", 0, p.name.split(".")[0]).to_pylist()
        for p in sorted(folder.glob("*.annotations.parquet"))
    }
    records = {
        p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "finished_at"}
        for p in sorted(folder.glob("*.done.json"))
    }
    return tables, records


@pytest.mark.slow
def test_sigkill_mid_shard_then_resume_equals_uninterrupted(tmp_path):
    synthetic_photos(tmp_path / "src", 24)
    killed, clean = Store.create(tmp_path / "killed"), Store.create(tmp_path / "clean")
    for store in (killed, clean):
        ingest(str(tmp_path / "src"), store, shard_size=3)
    run_stage(clean, "classical", 0, classical_stage)
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE.format(root=str(ROOT), tests=str(ROOT / "tests")))
    proc = subprocess.Popen([sys.executable, str(script), str(killed.root)])
    folder = killed.root / "stages" / "classical" / "round-0"
    deadline = time.time() + 120
    try:
        while (
            len(list(folder.glob("*.done.json"))) < 2
            and time.time() < deadline
            and proc.poll() is None
        ):
            time.sleep(0.01)
        time.sleep(0.15)  # into the next shard
        going = last_run(killed, "classical", 0)
        assert going["state"] == "running" and f"pid {proc.pid} " in going["holder"], going
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # the record still says running; `status` knows its process is gone
    assert json.loads((killed.root / going["record"]).read_text())["state"] == "running"
    assert last_run(killed, "classical", 0)["state"] == "interrupted"
    assert "ended without finishing: its process was killed" in "\n".join(status_lines(killed))
    done_before = sorted(p.name.split(".")[0] for p in folder.glob("*.done.json"))
    assert 2 <= len(done_before) < 8, done_before
    resumed = run_stage(killed, "classical", 0, classical_stage)
    assert resumed.skipped == done_before and len(resumed.processed) == 8 - len(done_before)
    assert _outputs(killed) == _outputs(clean)
    ids = [
        i
        for shard in killed.shards()
        for i in killed.read_annotations("classical", 0, shard).column("id").to_pylist()
    ]
    assert len(ids) == len(set(ids)) and len(ids) > 24
    images = [
        i for shard in killed.shards() for i in killed.done_record("classical", 0, shard)["images"]
    ]
    assert sorted(images) == list(range(1, 25))
    assert last_run(killed, "classical", 0)["state"] == "finished"
    assert not any("last run" in line for line in status_lines(killed))
    # a run that ends removes its lock file; the killed one's stays, held by nobody
    left = killed.root / Path(going["record"]).with_suffix(".lock")
    assert list((killed.root / "runs").rglob("*.lock")) == [left]


def test_a_stopped_or_failed_run_says_so_in_its_record_and_status(demo_store):
    calls = []

    def interrupted(row, rgb):
        calls.append(row.image_id)
        if len(calls) == 3:  # in the second shard
            raise KeyboardInterrupt
        return classical_stage(row, rgb)

    with pytest.raises(KeyboardInterrupt):
        run_stage(demo_store, "classical", 0, interrupted)
    run = last_run(demo_store, "classical", 0)
    assert run["state"] == "stopped"
    line = [t for t in status_lines(demo_store) if "last run" in t]
    assert len(line) == 1 and "was stopped (Ctrl-C or SIGTERM)" in line[0]
    assert "the same `sa-engine run classical` command does the rest" in line[0]
    record = json.loads((demo_store.root / run["record"]).read_text())
    assert record["finished_at"] and record["processed"] == demo_store.shards()[:1]

    def full_disk():
        raise OSError("no space left on device")  # not an image's error: it ends the run

    with pytest.raises(OSError):
        run_stage(demo_store, "classical", 0, classical_stage, meta=full_disk)
    assert last_run(demo_store, "classical", 0) | {"record": None, "started_at": None} == {
        "record": None, "started_at": None, "state": "failed", "error": "OSError: no space left on device"
    }  # fmt: skip
