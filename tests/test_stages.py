"""The Ray shard pipeline: pool sizing, each step on a hand-built batch without Ray, then the
whole pipeline on an embedded local Ray (same tables as the single-process runner)."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sharding.manifest import ingest
from sharding.runner import run_stage
from sharding.store import Store
from stages.classical import classical_spec
from stages.config import RayConfig
from stages.pipeline import run_pipeline
from stages.steps import (
    ModelActor,
    StageSpec,
    build_dataset,
    decode,
    decoded_row_bytes,
    object_store_mb,
    post_process,
    read_shard,
)
from stages.resources import plan_actors
from stage_helpers import finish_raw, make_failing, make_raw
from store_helpers import classical_stage, synthetic_photos



# ---- pool sizing -----------------------------------------------------------------------------


def test_cpu_pool_leaves_room_for_reads_on_two_cpus():
    plan = plan_actors({"CPU": 2.0}, RayConfig())
    assert plan.actors == 2 and plan.num_gpus == 0 and plan.threads == 1
    assert 2.0 - plan.actors * plan.num_cpus >= plan.decode_cpus  # a read task always fits
    one = plan_actors({"CPU": 2.0}, RayConfig(model_actors=1, cpus_per_actor=2))
    assert one.actors == 1 and one.threads == 2 and 2.0 - one.num_cpus >= one.decode_cpus


def test_cpu_pool_per_node_and_gpu_pool():
    # two 2-CPU nodes: 4 actors, yet each node keeps io_cpus free even if all of its actors land
    plan = plan_actors({"CPU": 4.0}, RayConfig(), node_cpus=[2.0, 2.0])
    assert plan.actors == 4 and 2.0 - 2 * plan.num_cpus >= 0.5 - 1e-9
    # a head without CPUs (typical on clusters) does not constrain the workers
    assert plan_actors({"CPU": 16.0}, RayConfig(), node_cpus=[0.0, 16.0]).actors == 16
    gpu = plan_actors({"CPU": 32.0, "GPU": 4.0}, RayConfig(batch_size=8))
    assert (gpu.actors, gpu.num_gpus, gpu.batch_size) == (4, 1.0, 8)
    assert plan_actors({"CPU": 32.0, "GPU": 4.0}, RayConfig(), uses_model=False).num_gpus == 0
    with pytest.raises(ValueError, match="io_cpus"):
        plan_actors({"CPU": 0.5}, RayConfig())
    with pytest.raises(ValueError, match="batch_size"):
        RayConfig(batch_size=0)


# ---- the steps on a hand-built batch, without Ray ----------------------------------------------


@pytest.fixture()
def small_store(tmp_path):
    photos = synthetic_photos(tmp_path / "photos", 6, seed=1)
    store = Store.create(tmp_path / "store")
    ingest(str(photos[0].parent), store, shard_size=3)
    return store


def test_object_store_is_sized_to_the_largest_blocks(tmp_path, small_store, demo_photos):
    rows = decoded_row_bytes(small_store)
    manifest = small_store.manifest().to_pylist()
    assert rows.tolist() == [m["bytes"] + 3 * m["width"] * m["height"] for m in manifest]
    first = small_store.shards()[0]
    assert decoded_row_bytes(small_store, [first]).tolist() == [
        m["bytes"] + 3 * m["width"] * m["height"] for m in manifest if m["shard"] == first
    ]
    assert object_store_mb(small_store, RayConfig()) == 128  # small photos: the floor
    # a second ingest adds a manifest part (computed part by part): rows and shards across parts
    synthetic_photos(tmp_path / "more", 4, size=(200, 150), seed=2)
    ingest(str(tmp_path / "more"), small_store, shard_size=3)
    manifest = small_store.manifest().to_pylist()
    assert small_store.manifest_index().to_batches()[1:]  # (more than one batch)
    assert decoded_row_bytes(small_store).tolist() == [
        m["bytes"] + 3 * m["width"] * m["height"] for m in manifest
    ]
    picked = [small_store.shards()[1], small_store.shards()[-1]]
    assert decoded_row_bytes(small_store, picked).tolist() == [
        m["bytes"] + 3 * m["width"] * m["height"] for m in manifest if m["shard"] in picked
    ]
    # larger photos or blocks: 32 blocks of block_images of the largest decoded row
    photos = Store.create(tmp_path / "photos-store")
    ingest(str(demo_photos[0].parent), photos, shard_size=4)
    largest = int(decoded_row_bytes(photos).max())
    sized = object_store_mb(photos, RayConfig(block_images=64))
    assert sized == -(-32 * 64 * largest // 2**20) and sized > 128
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert object_store_mb(photos, RayConfig(block_images=10**6)) == int(0.3 * memory_mb)  # Ray's own


def _batch(rows):
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def test_steps_without_ray(small_store):
    store = small_store
    rows = list(read_shard({"shard": "shard-000000", "skip": json.dumps([2])}, str(store.root)))
    assert [r["image_id"] for r in rows] == [1, 3]  # already received images are not read again
    rows[1]["data"] = rows[1]["data"][:300]  # truncated after ingest: quarantined, not fatal
    decoded = [decode(r, max_pixels=store.max_pixels, min_side=store.min_side) for r in rows]
    assert decoded[0]["rgb"].shape == (120, 160, 3) and decoded[0]["outcome"] == b""
    assert pickle.loads(decoded[1]["outcome"]).quarantined["reason"] == "corrupt"
    out = ModelActor(classical_spec(), threads=1)(_batch(decoded))
    first, second = (pickle.loads(o) for o in out["outcome"])
    assert list(out["final"]) == [True, True] and second.quarantined["reason"] == "corrupt"
    expected = classical_stage(None, decoded[0]["rgb"]).masks
    assert [m.id for m in first.masks] == [65536 + k for k in range(len(expected))]
    assert [m.segmentation for m in first.masks] == [m.segmentation for m in expected]
    # a split stage: raw output from the actor, the CPU step finishes it (and may fail alone)
    spec = StageSpec("classical", make_raw, finish=finish_raw, uses_model=False)
    rows = list(read_shard({"shard": "shard-000000", "skip": "[]"}, str(store.root)))
    decoded = [decode(r, max_pixels=store.max_pixels, min_side=store.min_side) for r in rows]
    raw = ModelActor(spec, threads=1)(_batch(decoded))
    assert not any(raw["final"])
    done = [post_process({k: raw[k][i] for k in raw}, spec.name, spec.finish) for i in range(3)]
    outcomes = [pickle.loads(d["outcome"]) for d in done]
    assert [m.segmentation for m in outcomes[0].masks] == [m.segmentation for m in expected]
    assert outcomes[1].quarantined["reason"] == "stage_error"
    assert "post-processing failed" in outcomes[1].quarantined["detail"]


def test_spool_and_embeddings_commit_without_ray(small_store):
    """What the driver does with `StageResult.extra` (the gears: new image embeddings)."""
    from engine.gears.embeddings import EmbeddedImage, keep_embedded
    from stages.spool import Spool

    spool = Spool()
    spool.add("shard-000000", 3, {"c": 3})
    spool.add("shard-000000", 1, {"a": 1})
    extras = spool.extras("shard-000000", [3, 2, 1])
    assert list(extras) == [(1, {"a": 1}), (2, None), (3, {"c": 3})] == list(extras)
    spool.drop("shard-000000")
    assert list(extras) == [(1, None), (2, None), (3, None)]

    store, shard, fp = small_store, "shard-000000", "0123456789abcdef"
    report = keep_embedded(store, shard, [
        (1, EmbeddedImage(fp, b"one", 0.5)), (2, None), (3, EmbeddedImage(fp, None, 0.25))
    ])  # fmt: skip
    assert (report.encoded, report.reused, report.unreadable, report.seconds) == (1, 1, 1, 0.75)
    assert store.embedding_ids(fp, shard) == {1}
    path = store.embeddings_path(fp, shard)
    stamp = path.stat().st_mtime_ns
    keep_embedded(store, shard, [(1, EmbeddedImage(fp, None))])  # nothing new: no rewrite
    assert path.stat().st_mtime_ns == stamp
    keep_embedded(store, shard, [(3, EmbeddedImage(fp, b"three"))])  # added, the stored kept
    assert store.embedding_ids(fp, shard) == {1, 3}
    assert store.read_embedding(fp, shard, 1) == b"one"
    with pytest.raises(ValueError, match="different weights"):
        keep_embedded(store, shard, [
            (2, EmbeddedImage(fp, b"two")), (3, EmbeddedImage("fedcba9876543210", b"x"))
        ])  # fmt: skip
    assert store.embedding_ids(fp, shard) == {1, 3}  # the failed write left the file as it was


# ---- the whole pipeline on an embedded local Ray (`local_ray`, conftest.py) -------------------


@pytest.mark.slow
def test_pipeline_matches_single_process_runner(tmp_path, local_ray, demo_photos):
    photos = synthetic_photos(tmp_path / "photos", 7, seed=2)
    for p in demo_photos:
        (tmp_path / "photos" / p.name).write_bytes(p.read_bytes())
    stores = []
    for name in ("ray", "plain"):
        store = Store.create(tmp_path / name)
        ingest(str(photos[0].parent), store, shard_size=3)
        stores.append(store)
    store, plain = stores
    bad = store.shard_images()["shard-000001"][1]
    spec = StageSpec("classical", make_failing, {"bad_ids": [bad]}, uses_model=False)
    record = run_pipeline(store, spec, 0, RayConfig(progress=False))
    run_stage(plain, "classical", 0, make_failing([bad]))
    assert record["state"] == "finished" and sorted(record["processed"]) == store.shards()
    assert record["nodes"] == ["127.0.0.1"] and record["failures"] == []
    assert record["images"] == 10 and record["quarantined"] == 1
    (entry,) = record["quarantined_inputs"]
    assert entry["image_id"] == bad and entry["reason"] == "stage_error"
    assert "cannot segment" in entry["detail"]
    for shard in store.shards():
        assert store.read_annotations("classical", 0, shard).equals(
            plain.read_annotations("classical", 0, shard)
        )
        mine, theirs = (s.done_record("classical", 0, shard) for s in (store, plain))
        assert mine["images"] == theirs["images"] and mine["quarantined"] == theirs["quarantined"]
    saved = json.loads(Path(record["record_path"]).read_text())
    assert saved["step_seconds"]["model"] > 0 and saved["throughput"]["masks_per_s"] > 0
    # Ray has no resume: the engine's own skip does it, and nothing is rewritten
    folder = store.stage_dir("classical", 0)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = run_pipeline(store, spec, 0, RayConfig(progress=False))
    assert again["processed"] == [] and again["skipped"] == store.shards()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    # a lost shard output is redone alone, to the same bytes
    table = (folder / "shard-000002.annotations.parquet").read_bytes()
    (folder / "shard-000002.done.json").unlink()
    redo = run_pipeline(store, spec, 0, RayConfig(progress=False))
    assert redo["processed"] == ["shard-000002"]
    assert (folder / "shard-000002.annotations.parquet").read_bytes() == table


def test_blocks_hold_block_images_images(local_ray, small_store):
    """A block is what Ray hands a model actor: `ray.block_images` images, not a whole shard
    (whole shards left one actor working alone on the last ones: 0.83x the plain process's
    throughput at 50 images, 0.91x with blocks of 4)."""
    todo = {s: [] for s in small_store.shards()}  # 2 shards of 3 images
    for block_images, blocks in ((1, 6), (2, 4), (3, 2), (100, 2)):
        plan = plan_actors({"CPU": 2.0}, RayConfig(block_images=block_images), uses_model=False)
        ds = build_dataset(small_store, classical_spec(), todo, plan)
        assert ds.materialize().num_blocks() == blocks, block_images


@pytest.mark.slow
def test_failed_attempt_is_retried_over_unfinished_shards(tmp_path, local_ray, small_store):
    from stage_helpers import make_fails_once

    flag = tmp_path / "failed-once"
    spec = StageSpec("classical", make_fails_once, {"flag": str(flag)}, uses_model=False)
    # one actor: with a pool, a sibling actor that starts fine could take over the work
    record = run_pipeline(small_store, spec, 0, RayConfig(progress=False, model_actors=1))
    assert flag.exists() and record["state"] == "finished" and record["attempts"] == 2
    assert "failed to start" in record["failures"][0]["error"]
    assert sorted(record["processed"]) == small_store.shards() and record["images"] == 6
    flag.unlink()  # every attempt fails now: a clear error, and the run record says so
    (small_store.stage_dir("classical", 0) / "shard-000001.done.json").unlink()
    bad = StageSpec("classical", make_fails_once, {"flag": str(flag)}, uses_model=False)
    with pytest.raises(RuntimeError, match="1 shard\\(s\\) unfinished after 1 attempt"):
        run_pipeline(
            small_store, bad, 0, RayConfig(progress=False, max_attempts=1, model_actors=1)
        )
    failed = sorted((small_store.root / "runs" / "classical").glob("*.json"))[-1]
    assert json.loads(failed.read_text())["state"] == "failed"


def test_a_stopped_run_says_so_in_its_record(local_ray, small_store):
    """Ctrl-C (here raised by the per-shard callback, on the driver, after the first commit): the
    committed shard stays, the record says `stopped` with its end time (it said `running`
    forever), and a re-run does the rest."""

    def interrupt(shard, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(small_store, classical_spec(), 0, RayConfig(progress=False), on_shard=interrupt)
    (path,) = (small_store.root / "runs" / "classical").glob("*.json")
    record = json.loads(path.read_text())
    assert record["state"] == "stopped" and record["finished_at"] is not None
    assert len(record["processed"]) == 1
    again = run_pipeline(small_store, classical_spec(), 0, RayConfig(progress=False))
    assert again["state"] == "finished" and again["skipped"] == record["processed"]
