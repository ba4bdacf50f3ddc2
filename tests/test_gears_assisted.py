"""Gear 1 in batch on real COCO photos, as a Ray pipeline from the CLI (`sa-engine run assisted` on
an embedded local Ray): embeddings stored with the shard, the simulated annotator driven by COCO
reference masks, effort kept per mask, re-runs, the effort report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.cli.main import app
from engine.references import ReferenceSet
from store_helpers import person_photo_store


@pytest.fixture(scope="module")
def coco(shared_data_dir):
    path = shared_data_dir / "annotations" / "coco_persons_keypoints.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path, shared_data_dir / "images"


def test_references_decode_like_pycocotools(coco):
    from pycocotools.coco import COCO

    path, images = coco
    refs = ReferenceSet.load(path)
    api = COCO(str(path))
    by_file = {img["file_name"]: img["id"] for img in api.dataset["images"]}
    checked = 0
    for image in refs.images[:8]:
        match = refs.match(str(images / image.file_name))
        assert match is image
        for ref in image.references:
            expected = api.annToMask(api.anns[ref.annotation_id]).astype(bool)
            assert np.array_equal(ref.mask(), expected)
            assert api.anns[ref.annotation_id]["image_id"] == by_file[image.file_name]
            checked += 1
    assert checked > 0
    assert refs.skipped.get("iscrowd", 0) == sum(a["iscrowd"] for a in api.dataset["annotations"])
    assert refs.match("/elsewhere/not-a-reference.jpg") is None


def test_references_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ReferenceSet.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not COCO JSON"):
        ReferenceSet.load(tmp_path / "bad.json")


def _store(tmp_path, coco, count=2, shard_size=2):
    path, images = coco
    store, chosen = person_photo_store(tmp_path, ReferenceSet.load(path), images, count, 2, shard_size)
    return store, sum(len(i.references) for i in chosen)


def _fingerprint(parity_dir) -> str:
    from engine.model import build_sam
    from engine.predictor import encoder_fingerprint

    return encoder_fingerprint(
        build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    )


@pytest.fixture(scope="module")
def model(parity_dir):
    return ["--model", str(parity_dir / "config.json"), "--checkpoint", str(parity_dir / "sam_small.pth")]  # fmt: skip


def test_assisted_on_ray_keeps_effort_and_stores_embeddings(
    tmp_path, coco, model, parity_dir, local_ray
):
    path, _ = coco
    store, n_refs = _store(tmp_path, coco, count=3)  # shards of 2 and 1 images
    first, second = store.shards()
    quiet = ["--set", "ray.progress=false"]
    # people first on the second shard: the actors only encode; no stage output is written
    embed = CliRunner().invoke(app, ["run", "assisted", str(store.root), "--annotator", "none",
                                     "--shard", second, *model, *quiet,
                                     "--set", "ray.model_actors=1"])  # fmt: skip
    assert embed.exit_code == 0, embed.output
    assert f"{second}: 1 encoded, 0 already stored" in embed.output
    assert "embeddings round 0: 1 shard(s) committed" in embed.output
    assert not store.stage_dir("assisted", 0).exists()
    fingerprint = _fingerprint(parity_dir)
    assert store.embedding_ids(fingerprint, second) == set(store.shard_images()[second])
    # gear 1: two model actors share the first shard; the fixture model is weak: accept at IoU
    # 0.5; few clicks keep the test fast
    args = ["run", "assisted", str(store.root), "--references", str(path), *model, *quiet,
            "--set", "annotate.target_iou=0.5", "--set", "annotate.max_clicks=4"]  # fmt: skip
    # a person's session holds the second shard: the batch run leaves it to them
    from engine.gears.server import AnnotationSession
    from engine.model import build_sam
    from engine.predictor import SamPredictor
    from sharding import Store

    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    person = AnnotationSession(Store(store.root), SamPredictor(sam))
    assert person.next_image(after=store.shard_images()[first][-1])["shard"] == second
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "assisted round 0: 1 shard(s) committed, 0 already done, 0 unfinished" in result.output
    assert f"1 shard(s) left to the annotation sessions holding them (`sa-engine status` says whose): {second}" in result.output
    assert f"{first}: 2 images" in result.output and "2 encoded / 0 reused" in result.output
    assert store.done_record("assisted", 0, second) is None
    person.close()  # the person stops without annotating the shard
    # while a batch run holds the round, no session takes a shard of it, nor does a second run
    batch = store.hold_batch_run("assisted", 0)
    with pytest.raises(ValueError, match="a batch run of assisted round 0 is writing this round"):
        AnnotationSession(Store(store.root), SamPredictor(sam)).next_image()
    with pytest.raises(ValueError, match="another batch run of assisted round 0 is running"):
        store.hold_batch_run("assisted", 0)
    batch.release()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "assisted round 0: 1 shard(s) committed, 1 already done, 0 unfinished" in result.output
    assert f"{second}: 1 images" in result.output and "0 encoded / 1 reused" in result.output

    rows, given_up = [], 0
    for shard in (first, second):
        record = store.done_record("assisted", 0, shard)
        meta = record["meta"]
        assert record["images"] == store.shard_images()[shard] and record["quarantined"] == []
        assert meta["annotator"] == "simulated" and meta["references"] == str(path.resolve())
        assert meta["annotator_config"]["target_iou"] == 0.5 and meta["without_references"] == []
        assert meta["given_up_seconds"] == pytest.approx(1.5 * meta["given_up_clicks"])
        shard_rows = store.read_annotations("assisted", 0, shard).to_pylist()
        assert record["counts"]["annotations"] == len(shard_rows)
        rows += shard_rows
        given_up += meta["given_up"]
        # the embeddings are stored with the shard, by the encoder that answered the clicks
        assert store.embedding_ids(fingerprint, shard) == set(record["images"])
    assert store.done_record("assisted", 0, first)["meta"]["embedded"]["encoded"] == 2
    assert store.done_record("assisted", 0, second)["meta"]["embedded"]["reused"] == 1
    assert len(rows) + given_up == n_refs  # every reference was annotated or given up
    assert rows, "the fixture model should reach IoU 0.5 on at least one reference"
    from engine import rle

    references = ReferenceSet.load(path)
    sources = dict(zip(*store.manifest().select(["image_id", "source"]).to_pydict().values()))
    negative = 0
    for row in rows:
        assert row["stage"] == "assisted" and row["round"] == 0
        assert row["annotator"] == "simulated" and row["prefilled"] is False
        assert 1 <= row["clicks"] <= 4 and row["iou"] >= 0.5
        assert row["seconds"] == pytest.approx(row["clicks"] * 1.5)
        # point_coords: the foreground clicks only (SA-1B readers take them as points on the object)
        assert 1 <= len(row["point_coords"]) <= row["clicks"]
        negative += row["clicks"] - len(row["point_coords"])
        segmentation = {"size": row["rle_size"], "counts": row["rle_counts"]}
        assert int(rle.area([segmentation])[0]) == row["area"] > 0
        # finished with brush and eraser (annotate.refine: brush): the stored mask is exactly
        # one of the image's references, while the effort is that of the clicks
        assert row["brushed"] is True
        stored = rle.decode([segmentation])[0].astype(bool)
        image = references.match(str(sources[row["image_id"]]))
        assert any(np.array_equal(stored, r.mask()) for r in image.references)
        (reference,) = [r.mask() for r in image.references if np.array_equal(stored, r.mask())]
        assert all(reference[int(y), int(x)] for x, y in row["point_coords"])
    assert negative >= 1, "the fixture should need a background click somewhere (else this checks nothing)"
    paths = sorted((store.root / "runs" / "assisted").glob("*-round-0.json"))  # the two runs
    runs = [json.loads(p.read_text()) for p in paths]
    assert [r["held_by_sessions"] for r in runs] == [[second], []]
    run = runs[0]
    assert run["runner"] == "ray" and run["state"] == "finished" and run["plan"]["actors"] == 2
    assert run["nodes"] == ["127.0.0.1"] and run["meta"]["references"] == str(path.resolve())

    # a re-run skips the committed shards and rewrites nothing; so does embedding for people
    folder = store.stage_dir("assisted", 0)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0 and "0 shard(s) committed, 2 already done" in rerun.output
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    again = CliRunner().invoke(app, ["run", "assisted", str(store.root), "--annotator", "none",
                                     *model, *quiet])  # fmt: skip
    assert again.exit_code == 0 and "0 shard(s) committed, 2 already done" in again.output

    out = tmp_path / "report"
    report = CliRunner().invoke(app, ["report", str(store.root), "--out", str(out)])
    assert report.exit_code == 0, report.output
    lines = [l for l in report.output.splitlines() if l.startswith("1 assisted")]
    assert len(lines) == 1 and lines[0].split()[2:5] == ["0", "3", str(len(rows))]
    saved = json.loads((out / "effort.json").read_text())
    assert saved[0]["masks"] == len(rows) and saved[0]["given_up"] == given_up
    assert saved[0]["clicks_per_mask"] == pytest.approx(np.mean([r["clicks"] for r in rows]))
    assert (out / "effort.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assisted_quarantines_mismatched_references(tmp_path, coco, model, parity_dir, local_ray):
    path, images = coco
    store, _ = _store(tmp_path, coco, count=1)
    data = json.loads(path.read_text())
    source = store.manifest().column("source")[0].as_py()
    for image in data["images"]:
        if source.endswith(image["file_name"]):
            image["width"] += 1  # references of another frame than the store image
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["run", "assisted", str(store.root), "--references", str(bad),
                                      *model, "--set", "ray.model_actors=1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "quarantined 1" in result.output and "upright frame" in result.output
    shard = store.shards()[0]
    record = store.done_record("assisted", 0, shard)
    assert record["counts"]["quarantined"] == 1 and record["images"] == []
    assert "upright frame" in record["quarantined"][0]["detail"]
    # the image was encoded before its references were refused: its embedding is kept
    assert record["meta"]["embedded"]["encoded"] == 1
    assert store.embedding_ids(_fingerprint(parity_dir), shard) == {1}


def test_assisted_cli_errors(tmp_path, coco):
    store, _ = _store(tmp_path, coco, count=1)
    for command in (["assisted"], ["run", "assisted"]):  # the hidden alias is the same command
        result = CliRunner().invoke(app, [*command, str(store.root), "--random-weights"])
        assert result.exit_code == 1 and "needs --references" in result.output
    result = CliRunner().invoke(app, ["run", "assisted", str(tmp_path / "nostore"), "--references",
                                      str(coco[0]), "--random-weights"])  # fmt: skip
    assert result.exit_code == 1 and "not a store" in result.output
    result = CliRunner().invoke(app, ["run", "assisted", str(store.root), "--references",
                                      str(coco[0]), "--set", "annotate.bogus=1"])  # fmt: skip
    assert result.exit_code == 1 and "unknown keys ['bogus']" in result.output
    result = CliRunner().invoke(app, ["run", "assisted", str(store.root), "--references",
                                      str(coco[0]), "--model", "vit_b"])  # fmt: skip
    assert result.exit_code == 1 and "--checkpoint is required" in result.output
    result = CliRunner().invoke(app, ["run", "assisted", str(store.root), "--references",
                                      str(coco[0]), "--set", "ray.batch_size=0"])  # fmt: skip
    assert result.exit_code == 1 and "ray.batch_size=0 is invalid" in result.output
    result = CliRunner().invoke(app, ["serve", str(store.root), "--model", "vit_b"])
    assert result.exit_code == 1 and "--checkpoint is required" in result.output
    result = CliRunner().invoke(app, ["serve", str(store.root), "--token", "a;b"])
    assert result.exit_code == 1 and "--token may hold only letters, digits" in result.output
    result = CliRunner().invoke(app, ["report", str(store.root)])
    assert result.exit_code == 1 and "no finished gear" in result.output


def test_web_session_quarantines_an_unreadable_image_with_its_reason(tmp_path, parity_dir, demo_photos):
    """The web tool skips an image its loader refuses (bit rot in a shard) and records why, in the
    shard's record and the store's quarantine; a later session's commits keep that entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.gears.server import AnnotationSession
    from engine.model import build_sam
    from engine.predictor import SamPredictor
    from sharding import Store, ingest

    store = Store.create(tmp_path / "store")
    ingest(str(demo_photos[0].parent), store, shard_size=4)
    path = store.shard_path("shard-000000")  # cut image 1's bytes, as a rotting disk would
    table = pq.read_table(path)
    data = table.column("data").to_pylist()
    data[0] = data[0][:1000]
    column = table.schema.get_field_index("data")
    pq.write_table(table.set_column(column, "data", pa.array(data, pa.binary())), path)
    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")

    assert AnnotationSession(store, SamPredictor(sam)).next_image()["image_id"] == 2
    record = store.done_record("assisted", 0, "shard-000000")
    assert record["images"] == [1] and record["quarantined"][0]["reason"] == "corrupt"
    (entry,) = [q for q in store.quarantine().to_pylist() if q["stage"] == "assisted"]
    assert entry["image_id"] == 1 and entry["source"].endswith(demo_photos[0].name)

    later = AnnotationSession(Store(store.root), SamPredictor(sam))
    later.finish_image(later.next_image()["image_id"])
    record = store.done_record("assisted", 0, "shard-000000")
    assert record["images"] == [1, 2] and [q["image_id"] for q in record["quarantined"]] == [1]


def test_two_web_sessions_share_a_store_shard_by_shard(tmp_path, parity_dir, demo_photos):
    """Two people, one server each, on one store: each session holds the shards it opens, the
    other passes over them and cannot click there, and a shard taken over after its holder
    stopped keeps the holder's masks (a session reads the shard afresh when it takes it)."""
    from engine.gears.server import AnnotationSession
    from engine.model import build_sam
    from engine.predictor import SamPredictor
    from sharding import Store, ingest

    store = Store.create(tmp_path / "store")
    for photo in demo_photos[:3]:
        ingest(str(photo), store, shard_size=2)  # one photo at a time: shards of 1, 1 and 1 image
    assert store.shards() == ["shard-000000", "shard-000001", "shard-000002"]
    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    first = AnnotationSession(store, SamPredictor(sam))
    second = AnnotationSession(Store(store.root), SamPredictor(sam))
    third = AnnotationSession(Store(store.root), SamPredictor(sam))  # opened now, used last

    mine = first.next_image()
    assert (mine["image_id"], mine["shard"]) == (1, "shard-000000")
    theirs = second.next_image()
    assert theirs["shard"] == "shard-000001"  # shard-000000 is the first session's
    with pytest.raises(ValueError, match="shard-000000, which another annotation session holds"):
        second.click(1, 100, 100, True)
    first.click(1, 140, 130, True)
    saved = first.accept(1)["saved_id"]
    second.finish_image(theirs["image_id"])  # and goes on to shard-000002
    assert second.next_image(after=theirs["image_id"])["shard"] == "shard-000002"
    second.finish_image(3)
    left = second.next_image()
    assert left["image_id"] is None and left["elsewhere"] == 1  # image 1, in the first's shard
    status = CliRunner().invoke(app, ["status", str(store.root)]).output  # who holds what
    first_holds = r"assisted round 0: an annotation session \(pid \d+ on .*\) holds 1 shard\(s\): shard-000000\n"
    assert re.search(first_holds, status), status
    assert "holds 2 shard(s): shard-000001, shard-000002" in status

    first.close()  # the first person stops; the second takes shard-000000 over
    second.skip(1)
    second.finish_image(1)
    rows = store.read_annotations("assisted", 0, "shard-000000").to_pylist()
    assert [r["id"] for r in rows] == [saved]  # the first person's mask is still there
    made_by = store.runs_that_made("assisted", 0, ["shard-000000"])  # a release names both people
    assert [run["run_record"] for run in made_by] == [
        f"runs/assisted/{session.run_path.name}" for session in (first, second)
    ]
    assert store.done_record("assisted", 0, "shard-000000")["images"] == [1]
    assert second.next_image() == {"image_id": None, "done": 3, "total": 3, "elsewhere": 0}
    second.close()
    assert store.lease_holder("assisted", 0, "shard-000000") is None and store.leases() == []
    # a session that read the store before the others finished it takes each shard, finds it
    # finished, and lets go of it again
    assert third.next_image() == {"image_id": None, "done": 3, "total": 3, "elsewhere": 0}
    assert store.leases() == [] and third.leases == {}
