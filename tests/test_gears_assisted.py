"""Gear 1 in batch on real COCO photos: stored embeddings, the simulated annotator driven by COCO
reference masks, effort kept per mask, the effort report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.cli.main import app
from engine.references import ReferenceSet
from sharding import Store, ingest


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


def _store(tmp_path, coco, count=2):
    path, images = coco
    refs = ReferenceSet.load(path)
    chosen = [i for i in refs.images if 1 <= len(i.references) <= 2][:count]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{images / i.file_name}\n" for i in chosen))
    store = Store.create(tmp_path / "store")
    ingest(str(listing), store, shard_size=count)
    return store, sum(len(i.references) for i in chosen)


def test_assisted_cli_keeps_effort_and_reuses_embeddings(tmp_path, coco, parity_dir):
    path, _ = coco
    store, n_refs = _store(tmp_path, coco)
    model = ["--model", str(parity_dir / "config.json"), "--checkpoint", str(parity_dir / "sam_small.pth")]
    # the fixture model is weak: accept at IoU 0.5; few clicks keep the test fast
    args = ["assisted", str(store.root), "--references", str(path), *model,
            "--set", "annotate.target_iou=0.5", "--set", "annotate.max_clicks=4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 shards done" in result.output and "2 encoded / 0 reused" in result.output

    shard = store.shards()[0]
    record = store.done_record("assisted", 0, shard)
    meta = record["meta"]
    rows = store.read_annotations("assisted", 0, shard).to_pylist()
    assert len(rows) + meta["given_up"] == n_refs  # every reference was annotated or given up
    assert meta["annotator_config"]["target_iou"] == 0.5 and meta["without_references"] == []
    assert rows, "the fixture model should reach IoU 0.5 on at least one reference"
    from engine import rle

    for row in rows:
        assert row["stage"] == "assisted" and row["round"] == 0
        assert row["annotator"] == "simulated" and row["prefilled"] is False
        assert 1 <= row["clicks"] <= 4 and row["iou"] >= 0.5
        assert row["seconds"] == pytest.approx(row["clicks"] * 1.5)
        assert len(row["point_coords"]) == row["clicks"]
        segmentation = {"size": row["rle_size"], "counts": row["rle_counts"]}
        assert int(rle.area([segmentation])[0]) == row["area"] > 0

    from engine.model import build_sam
    from engine.predictor import encoder_fingerprint

    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    assert store.embedding_ids(encoder_fingerprint(sam), shard) == set(record["images"])

    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0 and "0 shards done, 1 already done" in rerun.output
    # embedding for people (or another round of the same encoder) reuses them: nothing re-encoded
    again = CliRunner().invoke(app, ["assisted", str(store.root), "--annotator", "none", *model])
    assert again.exit_code == 0 and "0 encoded, 2 already stored" in again.output, again.output

    out = tmp_path / "report"
    report = CliRunner().invoke(app, ["report", str(store.root), "--out", str(out)])
    assert report.exit_code == 0, report.output
    lines = [l for l in report.output.splitlines() if l.startswith("1 assisted")]
    assert len(lines) == 1 and lines[0].split()[2:5] == ["0", "2", str(len(rows))]
    saved = json.loads((out / "effort.json").read_text())
    assert saved[0]["masks"] == len(rows) and saved[0]["given_up"] == meta["given_up"]
    assert saved[0]["clicks_per_mask"] == pytest.approx(np.mean([r["clicks"] for r in rows]))
    assert (out / "effort.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assisted_quarantines_mismatched_references(tmp_path, coco, parity_dir):
    path, images = coco
    store, _ = _store(tmp_path, coco, count=1)
    data = json.loads(path.read_text())
    source = store.manifest().column("source")[0].as_py()
    for image in data["images"]:
        if source.endswith(image["file_name"]):
            image["width"] += 1  # references of another frame than the store image
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["assisted", str(store.root), "--references", str(bad),
                                      "--model", str(parity_dir / "config.json"),
                                      "--checkpoint", str(parity_dir / "sam_small.pth")])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = store.done_record("assisted", 0, store.shards()[0])
    assert record["counts"]["quarantined"] == 1
    assert "upright frame" in record["quarantined"][0]["detail"]


def test_assisted_cli_errors(tmp_path, coco, parity_dir):
    store, _ = _store(tmp_path, coco, count=1)
    result = CliRunner().invoke(app, ["assisted", str(store.root), "--random-weights"])
    assert result.exit_code == 1 and "needs --references" in result.output
    result = CliRunner().invoke(app, ["assisted", str(tmp_path / "nostore"), "--references",
                                      str(coco[0]), "--random-weights"])  # fmt: skip
    assert result.exit_code == 1 and "not a store" in result.output
    result = CliRunner().invoke(app, ["assisted", str(store.root), "--references", str(coco[0]),
                                      "--random-weights", "--set", "annotate.bogus=1"])  # fmt: skip
    assert result.exit_code == 1 and "unknown keys ['bogus']" in result.output
    result = CliRunner().invoke(app, ["report", str(store.root)])
    assert result.exit_code == 1 and "no finished gear" in result.output
