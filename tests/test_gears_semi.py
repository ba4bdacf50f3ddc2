"""Gear 2 on real COCO photos, as a Ray pipeline from the CLI (`sa-engine run semi` on an embedded
local Ray): a detector trained on the driver on the store's gear-1 masks prefills images in the
model actors, the simulated annotator adds only what is missing, every mask says prefilled or
added."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.cli.main import app
from engine.gears.detector import DetectorConfig, box_nms, detect, heat_targets
from engine.references import ReferenceSet
from sharding import Store
from store_helpers import person_photo_store


def _box_iou(a, b) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def test_heat_targets_and_nms():
    heat, sides, where = heat_targets(torch.tensor([[100.0, 200.0, 300.0, 260.0]]))
    i, j = divmod(int(torch.argmax(heat)), 64)
    assert heat[i, j] == 1 and (i, j) == (230 // 16, 200 // 16)
    d = torch.expm1(sides[:, i, j]) * 16  # distances from the centre cell to the four sides
    cx, cy = (j + 0.5) * 16, (i + 0.5) * 16
    assert torch.allclose(d, torch.tensor([cx - 100, cy - 200, 300 - cx, 260 - cy]), atol=1e-3)
    assert where.sum() >= 1 and not where[0, 0]
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    assert box_nms(boxes, 0.5).tolist() == [0, 2]
    with pytest.raises(ValueError, match="score_threshold"):
        DetectorConfig(score_threshold=1.5)


def test_semi_prefills_and_adds_only_missing(tmp_path, shared_data_dir, parity_dir, local_ray):
    refs_path = shared_data_dir / "annotations" / "coco_persons_keypoints.json"
    refs = ReferenceSet.load(refs_path)
    store, chosen = person_photo_store(tmp_path, refs, shared_data_dir / "images", 2, 3)
    n_refs = sum(len(i.references) for i in chosen)
    common = ["--references", str(refs_path), "--model", str(parity_dir / "config.json"),
              "--checkpoint", str(parity_dir / "sam_small.pth"),
              "--set", "annotate.target_iou=0.4", "--set", "annotate.max_clicks=2",
              "--set", "ray.progress=false"]  # fmt: skip
    gear1 = CliRunner().invoke(app, ["run", "assisted", str(store.root), *common])
    assert gear1.exit_code == 0, gear1.output
    shard = store.shards()[0]
    gear1_boxes = store.read_annotations("assisted", 0, shard).to_pylist()
    assert gear1_boxes, "gear 1 must leave masks for the detector to learn from"

    args = ["run", "semi", str(store.root), *common, "--set", "semi.steps=60"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "detector trained on" in result.output
    assert "semi round 0: 1 shard(s) committed, 0 already done, 0 unfinished" in result.output

    from engine.gears.detector import TrainedDetector
    from engine.gears.semi import detector_path
    from engine.predictor import ImageEmbedding

    detector = TrainedDetector.load(detector_path(store, 0))
    assert detector.trained_on["rounds"] == {shard: 0}
    assert detector.trained_on["boxes"] == len(gear1_boxes)
    loss_first, loss_last = detector.trained_on["loss_first_last"]
    assert loss_last < loss_first / 5
    # the detector finds the boxes it was trained on (on the stored embeddings)
    for row in gear1_boxes[:2]:
        state = ImageEmbedding.from_bytes(
            store.read_embedding(detector.encoder_fingerprint, shard, row["image_id"])
        )
        boxes, _ = detect(detector, state.features, state.input_size)
        scale = max(state.input_size) / max(state.original_size)
        x, y, w, h = row["bbox"]
        truth = np.array([x, y, x + w, y + h]) * scale
        assert max(_box_iou(b, truth) for b in boxes.numpy()) > 0.5

    record = store.done_record("semi", 0, shard)
    meta = record["meta"]
    rows = store.read_annotations("semi", 0, shard).to_pylist()
    prefilled = [r for r in rows if r["prefilled"]]
    added = [r for r in rows if not r["prefilled"]]
    assert len(prefilled) == meta["prefilled"] > 0
    for r in prefilled:
        assert r["annotator"] == "detector" and r["clicks"] == 0 and r["seconds"] == 0
        assert r["point_coords"] == [] and r["stage"] == "semi"
    for r in added:
        assert r["annotator"] == "simulated" and r["clicks"] >= 1 and r["iou"] >= 0.4
    # every reference is covered by a prefilled mask, added by the annotator, or given up
    assert meta["covered_by_prefill"] + len(added) + meta["given_up"] == n_refs
    # the actors answered from the embeddings gear 1 stored; the record names the detector
    assert meta["embedded"]["reused"] == 2 and meta["embedded"]["encoded"] == 0
    assert meta["detector"] == detector.trained_on and meta["semi_config"]["steps"] == 60
    assert meta["annotator_config"]["target_iou"] == 0.4 and meta["without_references"] == []
    (run_path,) = (store.root / "runs" / "semi").glob("*-round-0.json")
    run = json.loads(run_path.read_text())
    assert run["state"] == "finished" and run["meta"]["detector"]["path"] == str(
        detector_path(store, 0).resolve()
    )

    # a re-run skips the committed shard; the detector of the round is reused, not retrained
    stamps = {p.name: p.stat().st_mtime_ns for p in store.stage_dir("semi", 0).iterdir()}
    again = CliRunner().invoke(app, args + ["--round", "0"])
    assert again.exit_code == 0 and "detector trained" not in again.output  # reused
    assert "0 shard(s) committed, 1 already done" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in store.stage_dir("semi", 0).iterdir()} == stamps
    report = CliRunner().invoke(app, ["report", str(store.root)])
    line = next(l for l in report.output.splitlines() if l.strip().startswith("2 semi"))
    assert line.split()[6:8] == [str(len(prefilled)), str(len(added))]

    # people in gear 2: the web tool's session opens images prefilled by the same detector
    from engine.gears.semi import SemiConfig, prefill
    from engine.gears.server import AnnotationSession
    from engine.model import build_sam
    from engine.predictor import SamPredictor

    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    semi_cfg = SemiConfig()
    session = AnnotationSession(
        Store(store.root), SamPredictor(sam), round_=1, stage="semi",
        prefill=lambda p: prefill(detector, p, semi_cfg),
    )  # fmt: skip
    expected = {}
    for r in prefilled:
        expected[r["image_id"]] = expected.get(r["image_id"], 0) + 1
    info = session.next_image()
    assert info["prefilled"] == info["accepted"] == expected.get(info["image_id"], 0)
    session.finish_image(info["image_id"])
    saved = store.read_annotations("semi", 1, shard).to_pylist()
    assert len(saved) == info["prefilled"] and all(r["prefilled"] for r in saved)

    # and from the command line: `sa-engine serve --stage semi` opens images prefilled the same way
    with _serving(store, [
        "--stage", "semi", "--round", "2", "--detector", str(detector_path(store, 0)),
        "--model", str(parity_dir / "config.json"), "--checkpoint", str(parity_dir / "sam_small.pth"),
    ]) as url:  # fmt: skip
        served = _get(url + "api/next")
        while served["image_id"] is not None and not served["prefilled"]:  # to one with prefills
            served = _post(url + "api/finish", {"image_id": served["image_id"]})
        assert served["image_id"] is not None
        _post(url + "api/finish", {"image_id": served["image_id"]})  # keep its prefilled masks
    assert served["prefilled"] == served["accepted"] == expected[served["image_id"]] > 0
    (path,) = (store.root / "runs" / "semi").glob("*-round-2.json")  # the session's run record
    run = json.loads(path.read_text())
    assert run["state"] == "stopped" and run["processed"] == [shard]
    assert run["meta"]["detector"]["path"] == str(detector_path(store, 0).resolve())
    assert run["meta"]["detector"]["trained_on"] == detector.trained_on
    assert run["meta"]["semi"] == dataclasses.asdict(semi_cfg)


def _get(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=120) as reply:
        return json.loads(reply.read())


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


@contextlib.contextmanager
def _serving(store, args):
    """`sa-engine serve STORE ARGS` on a free port for the block; yields its URL."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", str(store.root), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        lines, match = [], None
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"http://127\.0\.0\.1:\d+/", line)
            if match:
                break
        assert match, f"serve did not start: {''.join(lines)}"
        yield match.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
