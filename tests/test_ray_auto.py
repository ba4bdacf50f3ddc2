"""Gear 3 (`sa-engine run auto`) from the command line on an embedded local Ray, on real photos:
the store gets exactly the masks the automatic generator makes in one plain process, and the run
record names the weights and settings that made them."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from engine.amg_config import AmgConfig
from engine.cli.config import load_config, section
from engine.cli.main import app
from engine.model_config import ModelConfig
from engine.provenance import sha256_file
from sharding.manifest import ingest
from sharding.runner import run_stage
from sharding.store import Store
from stages.auto import auto_spec, finish_auto, make_auto

pytestmark = pytest.mark.slow

# the sa1b config (the command's default) with a small grid and no crops, to stay quick
SETTINGS = {"points_per_side": 4, "crop_n_layers": 0, "pred_iou_thresh": 0.5,
            "stability_score_thresh": 0.5}  # fmt: skip


def test_run_auto_on_ray_equals_the_plain_generator(tmp_path, parity_dir, demo_photos, local_ray):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in demo_photos[:3]:
        (photos / p.name).write_bytes(p.read_bytes())
    stores = {}
    for name in ("ray", "plain"):
        stores[name] = Store.create(tmp_path / name)
        ingest(str(photos), stores[name], shard_size=2)
    config, checkpoint = parity_dir / "config.json", parity_dir / "sam_small.pth"

    sets = [f"amg.{key}={value}" for key, value in SETTINGS.items()]
    args = ["run", "auto", str(stores["ray"].root), "--model", str(config), "--checkpoint",
            str(checkpoint), "--set", "ray.progress=false"]  # fmt: skip
    for pair in sets:
        args += ["--set", pair]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "auto round 0: 2 shard(s) committed, 0 already done" in result.output

    (path,) = (stores["ray"].root / "runs" / "auto").glob("*-round-0.json")
    record = json.loads(path.read_text())
    model = ModelConfig(model=str(config), checkpoint=str(checkpoint))
    spec, _ = auto_spec(model, section(load_config("sa1b", sets), "amg", AmgConfig))
    generate = make_auto(**spec.make_kwargs)
    # with the actors' torch threads: the float sums, so the last bits of the scores, follow the
    # thread count (this process's default differs, and earlier tests may have changed it)
    before = torch.get_num_threads()
    torch.set_num_threads(record["plan"]["threads"])
    try:
        run_stage(stores["plain"], "auto", 0, lambda row, rgb: finish_auto(row, generate(row, rgb)))
    finally:
        torch.set_num_threads(before)
    masks = 0
    for shard in stores["plain"].shards():
        on_ray = stores["ray"].read_annotations("auto", 0, shard).to_pylist()
        plain = stores["plain"].read_annotations("auto", 0, shard).to_pylist()
        assert on_ray == plain  # the same masks, ids, scores and boxes, in the same order
        masks += len(plain)
    assert masks > 0

    assert record["state"] == "finished" and record["annotations"] == masks
    weights = record["meta"]["model"]["weights"]
    assert weights == {"path": str(checkpoint), "sha256": sha256_file(checkpoint)}
    assert {k: record["meta"]["amg"][k] for k in SETTINGS} == SETTINGS
    assert record["versions"]["torch"] != "not installed"

    again = CliRunner().invoke(app, args)  # every shard is done: nothing is redone
    assert again.exit_code == 0 and "0 shard(s) committed, 2 already done" in again.output


def test_a_model_that_cannot_load_fails_once_with_its_own_error(
    tmp_path, parity_dir, demo_photos, local_ray
):
    """The checkpoint does not fit the named model: the actors fail as they start, and when the
    second attempt fails alike the command stops there and names the cause in one line (it was
    three attempts and a cut-off ActorDiedError)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / demo_photos[0].name).write_bytes(demo_photos[0].read_bytes())
    store = Store.create(tmp_path / "store")
    ingest(str(photos), store, shard_size=2)
    args = ["run", "auto", str(store.root), "--model", "vit_b", "--checkpoint",
            str(parity_dir / "sam_small.pth"), "--set", "ray.progress=false"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    (last,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert last.startswith("error: auto round 0: the model actors could not start, twice alike: "
                           "CheckpointMismatchError: checkpoint ")  # fmt: skip
    assert "does not fit vit_b" in last and "Not tried again" in last
    (path,) = (store.root / "runs" / "auto").glob("*-round-0.json")
    record = json.loads(path.read_text())
    assert record["state"] == "failed" and record["attempts"] == 2  # not ray.max_attempts (3)
    first, second = record["failures"]
    assert first["error"] == second["error"] and first["error"].startswith("CheckpointMismatchError: ")
    assert (first["start_failed_again"], second["start_failed_again"]) == (False, True)
