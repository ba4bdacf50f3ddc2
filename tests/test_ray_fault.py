"""Fault tolerance for real: a local two-node Ray cluster on loopback loses its worker node in the
middle of `sa-engine run`, and every shard is still committed exactly once, with nothing lost and
no annotation twice (the same tables as the single-process runner gives); an ingest on the
cluster loses it while scanning files, and still writes the local ingest's store; and an SA-1B
export loses it while writing tars, and still writes the one-process export's release."""

import json
import subprocess
import sys
import time

import pytest

from ray_cluster import LocalCluster, node_env
from sharding.manifest import ingest
from sharding.export_sa1b import export_sa1b
from sharding.runner import StageResult, run_stage
from sharding.store import Store
from store_helpers import blur_stage, classical_stage, synthetic_photos

SHARDS, PER_SHARD = 12, 4


@pytest.fixture()
def cluster():
    c = LocalCluster()
    try:
        c.start_node("head", num_cpus=2, head=True)
        c.start_node("worker", num_cpus=2)
        yield c
    finally:
        c.stop()


def _done(store: Store) -> list[str]:
    folder = store.stage_dir("classical", 0)
    return sorted(p.name for p in folder.glob("*.done.json")) if folder.is_dir() else []


@pytest.mark.slow
def test_worker_node_killed_mid_run(tmp_path, cluster):
    photos = synthetic_photos(tmp_path / "photos", SHARDS * PER_SHARD, size=(640, 480), seed=3)
    store = Store.create(tmp_path / "store")
    ingest(str(photos[0].parent), store, shard_size=PER_SHARD)
    reference = Store.create(tmp_path / "reference")
    ingest(str(photos[0].parent), reference, shard_size=PER_SHARD)
    run_stage(reference, "classical", 0, classical_stage)

    cmd = [sys.executable, "-m", "engine.cli", "run", "classical", str(store.root)]
    cmd += ["--address", cluster.address, "--set", "ray.progress=false"]
    log = (tmp_path / "run.log").open("w")
    driver = subprocess.Popen(cmd, env=node_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while len(_done(store)) < 2:  # the run is under way: some shards committed, most not
            assert driver.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard committed in 90 s"
            time.sleep(0.1)
        done_before = _done(store)
        workers_busy = [
            p for p in cluster.pids("worker") if b"ray::" in open(f"/proc/{p}/cmdline", "rb").read()
        ]
        assert cluster.kill_node("worker") > 0
        assert len(done_before) < SHARDS, "the run ended before the node was killed"
        assert workers_busy, "no Ray worker process was running on the worker node"
        assert driver.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    output = (tmp_path / "run.log").read_text()

    records = sorted((store.root / "runs" / "classical").glob("*.json"))
    assert len(records) == 1, output
    record = json.loads(records[0].read_text())
    assert record["state"] == "finished" and record["unfinished"] == []
    committed = record["processed"]
    assert sorted(committed) == store.shards() and len(committed) == len(set(committed))
    # nothing lost, nothing twice: the same tables as the single-process runner
    for shard in store.shards():
        done = store.done_record("classical", 0, shard)
        assert done is not None and done["images"] == store.shard_images()[shard]
        table = store.read_annotations("classical", 0, shard)
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)) and ids
        assert table.equals(reference.read_annotations("classical", 0, shard))
    assert record["images"] == SHARDS * PER_SHARD
    print(output[-2000:], json.dumps(record["failures"])[:1000])


def _running(cluster, name: str, task: bytes) -> bool:
    """Whether a process of node `name` is running the Ray task named `task` now."""
    for pid in cluster.pids(name):
        try:
            if task in open(f"/proc/{pid}/cmdline", "rb").read():
                return True
        except OSError:
            pass
    return False


def _kill_worker_during(cluster, cmd: list[str], log_path, task: bytes) -> str:
    """Runs the command `cmd` as a driver on `cluster`, SIGKILLs the worker node as soon as one
    of its processes runs the Ray task `task`, and returns the driver's output once it ended
    well (the node must die while the command still runs)."""
    with log_path.open("w") as log:
        driver = subprocess.Popen(cmd, env=node_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while not _running(cluster, "worker", task):
                assert driver.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no {task!r} task on the worker node in 90 s"
                time.sleep(0.02)
            assert cluster.kill_node("worker") > 0
            assert driver.poll() is None, "the command ended before the node was killed"
            assert driver.wait(timeout=180) == 0, log_path.read_text()[-3000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    return log_path.read_text()


@pytest.mark.slow
def test_worker_node_killed_mid_ingest(tmp_path, cluster):
    """`sa-engine ingest --address` loses the worker node while it scans files: Ray reruns the
    lost tasks and the store is the local ingest's, byte for byte."""
    photos = synthetic_photos(tmp_path / "photos", 96, size=(1600, 1200), seed=5)
    reference = Store.create(tmp_path / "reference")
    ingest(str(photos[0].parent), reference, shard_size=PER_SHARD)

    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "engine.cli", "ingest", str(photos[0].parent), "--store", str(store)]
    cmd += ["--address", cluster.address, "--shard-size", str(PER_SHARD), "--set", "ingest.chunk=2"]
    output = _kill_worker_during(cluster, cmd, tmp_path / "ingest.log", b"_scan_batch")
    assert "listed 96 files: 96 added in 24 new shards" in output, output[-3000:]
    tables = lambda root: {  # noqa: E731
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.parquet"))
        if not p.name.startswith(".")
    }  # fmt: skip
    assert tables(store) == tables(reference.root)
    print(output[-3000:])


@pytest.mark.slow
def test_worker_node_killed_mid_export(tmp_path, cluster):
    """`sa-engine export sa1b --address` loses the worker node while it writes tars: Ray reruns
    the lost tasks and the release is the one-process export's, byte for byte."""
    photos = synthetic_photos(tmp_path / "photos", 64, size=(2000, 1600), seed=7)
    store = Store.create(tmp_path / "store")
    ingest(str(photos[0].parent), store, shard_size=PER_SHARD)
    run_stage(store, "empty", 0, lambda row, rgb: StageResult())  # an annotation source
    run_stage(store, "privacy", 0, blur_stage)
    export_sa1b(store, tmp_path / "reference")  # (1875x1500: each image is resized and encoded)

    cmd = [sys.executable, "-m", "engine.cli", "export", "sa1b", str(store.root), "--out",
           str(tmp_path / "release"), "--address", cluster.address]  # fmt: skip
    output = _kill_worker_during(cluster, cmd, tmp_path / "export.log", b"_export_row")
    assert "16 tars, 64 images" in output, output[-3000:]
    for name in ["MEMBERS.tsv", "SHA256SUMS"] + [f"sa_{i:06d}.tar" for i in range(16)]:
        assert (tmp_path / "release" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    print(output[-3000:])
