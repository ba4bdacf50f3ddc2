"""The privacy stage through the shard runner and the release export, and the `blur` CLI: real
photos, real detectors; an unblurred image never reaches the release area."""

import json
import shutil
import tarfile

import numpy as np
from PIL import Image
import pytest
from typer.testing import CliRunner

from engine.cli.main import app
from engine.image_io import load_image
from engine.privacy import PrivacyConfig, PrivacyStage, run_privacy
from sharding import PRIVACY_STAGE, Store, ingest, run_stage
from sharding.export_sa1b import export_sa1b
from store_helpers import classical_stage

ASTRONAUT_FACE = (180, 62, 268, 180)  # hand-labelled XYXY face of demo/photos/astronaut.jpg


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return PrivacyConfig(cache_dir=str(tmp_path_factory.mktemp("privacy-cache")))


@pytest.fixture()
def photos(tmp_path, demo_photos):
    """astronaut (a face) + rocket in shard 0, chelsea + coffee in shard 1 (shard_size 2)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.jpg", "rocket.jpg", "chelsea.jpg", "coffee.jpg"):
        shutil.copy(next(p for p in demo_photos if p.name == name), folder / name)
    return folder


def test_stage_returns_blurred_jpeg_and_detections(cfg, demo_photos):
    stage = PrivacyStage(cfg)
    path = next(p for p in demo_photos if p.name == "astronaut.jpg")
    rgb = load_image(path)
    result = stage(None, rgb)
    assert result.image[:2] == b"\xff\xd8" and result.masks == []
    assert load_image(result.image).shape == rgb.shape
    assert result.meta["faces"] == 1 and result.meta["plates"] == 0
    (det,) = result.meta["detections"]
    assert det["kind"] == "face" and len(det["box"]) == 4 and 0.9 < det["score"] <= 1
    assert "AGPL-3.0" in result.meta["models"]["plate"] and "MIT" in result.meta["models"]["face"]


def test_unblurred_images_cannot_reach_the_release(cfg, photos, tmp_path):
    store = Store.create(tmp_path / "store")
    ingest(str(photos), store, shard_size=2)
    run_stage(store, "classical", 0, classical_stage)
    rows = {r.source.rsplit("/", 1)[-1]: r for s in store.shards() for r in store.iter_shard(s)}
    astronaut = rows["astronaut.jpg"]
    # privacy on the astronaut's shard only: the other shard must be refused, not released raw
    report = run_privacy(store, cfg, shards=[astronaut.shard])
    assert report.processed == [astronaut.shard]
    with pytest.raises(ValueError, match="have no privacy output"):
        export_sa1b(store, tmp_path / "rel")
    assert not (tmp_path / "rel").exists()
    run_privacy(store, cfg)  # now every shard
    export_sa1b(store, tmp_path / "rel")
    released, blurred = {}, {}
    for tar_path in sorted((tmp_path / "rel").glob("sa_*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    released[int(m.name[3:-4])] = load_image(tar.extractfile(m).read())
                else:
                    image = json.loads(tar.extractfile(m).read())["image"]
                    blurred[image["image_id"]] = image["blurred"]
    assert sorted(released) == sorted(r.image_id for r in rows.values())
    metas = {}
    for shard in store.shards():
        for image_id, _, meta in store.iter_output_images(PRIVACY_STAGE, 0, shard):
            metas[image_id] = meta
    # every face box the stage reported, and the hand-labelled one, differs in the release
    boxes = [(astronaut.image_id, ASTRONAUT_FACE)]
    boxes += [(i, d["box"]) for i, m in metas.items() for d in m["detections"]]
    assert metas[astronaut.image_id]["faces"] == 1
    # the release's metadata says what was blurred in each image
    assert blurred == {i: {"faces": m["faces"], "plates": m["plates"]} for i, m in metas.items()}
    for image_id, box in boxes:
        original = load_image(next(r for r in rows.values() if r.image_id == image_id).data)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        diff = np.abs(released[image_id][y0:y1, x0:x1].astype(int) - original[y0:y1, x0:x1])
        assert diff.mean() > 10, (image_id, box)
    # and images without faces are released as re-encoded photos of the same content
    rocket = rows["rocket.jpg"]
    assert metas[rocket.image_id]["faces"] == 0
    rdiff = np.abs(released[rocket.image_id].astype(int) - load_image(rocket.data)).mean()
    assert rdiff < 3
    record = json.loads(
        sorted((store.root / "runs" / PRIVACY_STAGE).glob("*-detectors.json"))[-1].read_text()
    )
    assert record["detectors"]["plate"]["licence"].startswith("AGPL-3.0")
    assert record["detectors"]["face"]["weights_sha256"]


def test_blur_cli_on_a_folder(cfg, photos, tmp_path):
    (photos / "sub").mkdir()
    shutil.move(photos / "astronaut.jpg", photos / "sub" / "astronaut.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cat = Image.open(photos / "chelsea.jpg").convert("RGB").resize((64, 48))
    frames = [cat, cat.rotate(90)]
    frames[0].save(photos / "moving.gif", save_all=True, append_images=frames[1:])
    (photos / "chelsea.jpg").unlink()
    (photos / "coffee.jpg").unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["blur", str(photos), "--out", str(out), "--set", f"privacy.cache_dir={cfg.cache_dir}"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == [
        "rocket.jpg",
        "sub/astronaut.jpg",
    ]  # the broken input is reported, never copied
    lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [(d["file"], d["kind"]) for d in lines] == [("sub/astronaut.jpg", "face")]
    assert set(lines[0]) == {"file", "kind", "box", "score"}
    report = json.loads((out / "report.json").read_text())
    assert [s["file"] for s in report["skipped"]] == ["broken.jpg"]
    assert report["images"] == 3 and report["faces"] == 1
    # an animated GIF is written as its first frame, and the report says so
    note = "2 frames: only the first is blurred and written"
    assert report["notes"] == [{"file": "moving.gif", "note": note}]
    assert Image.open(out / "moving.gif").n_frames == 1
    x0, y0, x1, y1 = (int(v) for v in lines[0]["box"])
    blurred = load_image(out / "sub" / "astronaut.jpg").astype(int)
    original = load_image(photos / "sub" / "astronaut.jpg").astype(int)
    assert np.abs(blurred[y0:y1, x0:x1] - original[y0:y1, x0:x1]).mean() > 10
    single = CliRunner().invoke(
        app,
        ["blur", str(photos / "rocket.jpg"), "--out", str(tmp_path / "one"),
         "--set", f"privacy.cache_dir={cfg.cache_dir}"],
    )  # fmt: skip
    assert single.exit_code == 0 and (tmp_path / "one" / "rocket.jpg").is_file()


def test_blur_cli_errors(tmp_path, photos):
    runner = CliRunner()
    missing = runner.invoke(app, ["blur", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    same = runner.invoke(app, ["blur", str(photos), "--out", str(photos)])
    assert same.exit_code == 1 and "overwrite the originals" in same.output
    bad = runner.invoke(
        app, ["blur", str(photos), "--out", str(tmp_path / "o"), "--set", "privacy.margin=0.5"]
    )
    assert bad.exit_code == 1 and "privacy.margin" in bad.output
