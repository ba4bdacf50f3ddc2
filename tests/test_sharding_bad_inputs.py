"""Every kind of bad input is normalised or quarantined with a reason, at ingest and in a stage run."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sharding.manifest import ingest
from sharding.runner import StageResult, run_stage
from sharding.status import status_lines
from sharding.store import Store
from store_helpers import classical_stage

NORMALISED = {
    "cmyk.jpg": "CMYK",
    "deep16.png": "I;16",
    "palette.png": "P",
    "alpha.png": "RGBA",
    "grey.jpg": "L",
    "rotated.jpg": "RGB",
}
QUARANTINED = {
    "truncated.jpg": "corrupt",
    "zero.jpg": "empty",
    "text.jpg": "not_an_image",
    "tiny.png": "too_small",
    "huge.png": "too_large",
}


def _save(image, fmt, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _make_bad_folder(folder):
    folder.mkdir()
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)
    rgb[30:60, 40:90] = 250
    photo = Image.fromarray(rgb)
    (folder / "good.jpg").write_bytes(_save(photo, "JPEG", quality=95))
    (folder / "cmyk.jpg").write_bytes(_save(photo.convert("CMYK"), "JPEG"))
    (folder / "deep16.png").write_bytes(
        _save(Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "PNG")
    )
    (folder / "palette.png").write_bytes(
        _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    )
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(xx < 64, 255, 0).astype(np.uint8)))
    (folder / "alpha.png").write_bytes(_save(rgba, "PNG"))
    (folder / "grey.jpg").write_bytes(_save(photo.convert("L"), "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    (folder / "rotated.jpg").write_bytes(_save(photo, "JPEG", exif=exif.tobytes()))
    whole = _save(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)), "JPEG"
    )
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "tiny.png").write_bytes(_save(Image.new("RGB", (20, 300), (9, 9, 9)), "PNG"))
    (folder / "huge.png").write_bytes(
        _save(Image.new("1", (12000, 9000)), "PNG")
    )  # 108 MP declared


def test_every_bad_kind_through_ingest_and_a_stage(tmp_path):
    _make_bad_folder(tmp_path / "bad")
    assert (tmp_path / "bad" / "huge.png").stat().st_size < 50_000
    store = Store.create(tmp_path / "store")
    report = ingest(str(tmp_path / "bad"), store, shard_size=4)
    assert report.listed == 12 and report.added == 7 and report.quarantined == 5
    reasons = {
        r["source"].rsplit("/", 1)[1]: r["reason"] for r in store.ingest_quarantine().to_pylist()
    }
    assert reasons == QUARANTINED
    assert all(r["detail"] for r in store.ingest_quarantine().to_pylist())
    manifest = {r["source"].rsplit("/", 1)[1]: r for r in store.manifest().to_pylist()}
    assert set(manifest) == set(NORMALISED) | {"good.jpg"}
    for name, mode in NORMALISED.items():
        assert manifest[name]["original_mode"] == mode, name
    assert (manifest["rotated.jpg"]["width"], manifest["rotated.jpg"]["height"]) == (96, 128)
    assert manifest["rotated.jpg"]["exif_rotated"] and not manifest["good.jpg"]["exif_rotated"]
    seen = []

    def checking_stage(row, rgb):
        assert rgb.dtype == np.uint8 and rgb.shape == (row.height, row.width, 3)
        seen.append(row.source.rsplit("/", 1)[1])
        return classical_stage(row, rgb)

    run = run_stage(store, "classical", 0, checking_stage)
    assert sorted(seen) == sorted(manifest) and run.images == 7 and run.quarantined == 0
    assert run.annotations > 0
    # re-ingest: the quarantined files are not recorded twice
    assert ingest(str(tmp_path / "bad"), store).quarantined == 0
    assert store.ingest_quarantine().num_rows == 5
    lines = status_lines(store)
    assert any("quarantine reasons:" in line and "too_large 1" in line for line in lines)
    listed = [line for line in lines if line.startswith("  quarantined (ingest) ")]
    assert len(listed) == 5  # each with its source, reason and detail
    assert any("truncated.jpg: corrupt (" in line and "sha256 " in line for line in listed), listed
    assert len([line for line in status_lines(store, listed=2) if "  quarantined" in line]) == 2
    assert "3 more: `sa-engine status" in status_lines(store, listed=2)[-1]


def test_a_broken_image_in_a_shard_never_stops_it(tmp_path, demo_photos):
    store = Store.create(tmp_path / "store")
    ingest(str(demo_photos[0].parent), store, shard_size=4)
    path = store.shard_path("shard-000000")  # bit rot in the store itself: cut image 2's bytes
    table = pq.read_table(path)
    data = table.column("data").to_pylist()
    data[1] = data[1][:1000]
    pq.write_table(
        table.set_column(table.schema.get_field_index("data"), "data", pa.array(data, pa.binary())),
        path,
    )

    def stage(row, rgb):
        if row.image_id == 3:
            raise RuntimeError("detector crashed")
        return classical_stage(row, rgb)

    run = run_stage(store, "gear", 1, stage)
    assert (run.images, run.quarantined) == (2, 2)
    q = {r["image_id"]: r for r in store.quarantine().to_pylist() if r["stage"] == "gear"}
    assert (
        q[2]["reason"] == "corrupt"
        and q[3]["reason"] == "stage_error"
        and "detector crashed" in q[3]["detail"]
    )
    assert (
        q[2]["round"] == 1
        and q[2]["shard"] == "shard-000000"
        and q[2]["source"].endswith("chelsea.jpg")
    )
    record = store.done_record("gear", 1, "shard-000000")
    assert record["images"] == [1, 4]


def test_wrong_frame_output_is_quarantined(tmp_path, demo_photos):
    store = Store.create(tmp_path / "store")
    ingest(str(demo_photos[0].parent), store)

    def wrong_size(row, rgb):
        return StageResult(masks=classical_stage(row, rgb[::2, ::2].copy()).masks)

    run = run_stage(store, "gear", 0, wrong_size)
    assert run.images == 0 and run.quarantined == 4
    assert {r["reason"] for r in store.quarantine().to_pylist()} == {"stage_error"}


def test_unreadable_folders_and_broken_links_are_recorded_not_dropped(tmp_path, demo_photos, parity_dir):
    """A sub-folder the user cannot list and a broken symbolic link, in `ingest`, `amg` and
    `blur` of a folder: each is recorded with its reason and the rest goes on (the folder was
    dropped without a word by all three, the link by `amg` and `blur`)."""
    import json
    import subprocess
    import sys

    from store_helpers import as_a_plain_user

    prefix = as_a_plain_user()
    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    (photos / "ok.jpg").write_bytes(demo_photos[0].read_bytes())
    (photos / "locked" / "in.jpg").write_bytes(demo_photos[1].read_bytes())
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (photos / "locked").chmod(0o000)

    def run(*args):
        done = subprocess.run(prefix + [sys.executable, "-m", "engine.cli", *args],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        return done

    try:
        run("ingest", str(photos), "--store", str(tmp_path / "store"))
        store = Store(tmp_path / "store")
        assert store.manifest().num_rows == 1
        reasons = {q["source"].rsplit("/", 1)[1]: (q["reason"], q["detail"])
                   for q in store.ingest_quarantine().to_pylist()}  # fmt: skip
        assert reasons["gone.jpg"][0] == "unreadable"
        assert reasons["locked"][0] == "unreadable" and "folder cannot be listed" in reasons["locked"][1]
        run("ingest", str(photos), "--store", str(tmp_path / "store"))  # again: recorded once
        assert store.ingest_quarantine().num_rows == 2

        run("amg", str(photos), "--out", str(tmp_path / "amg"), "--model", str(parity_dir / "config.json"),
            "--checkpoint", str(parity_dir / "sam_small.pth"), "--set", "amg.points_per_side=2",
            "--set", "amg.crop_n_layers=0")  # fmt: skip
        skipped = [json.loads(line) for line in (tmp_path / "amg" / "skipped.jsonl").read_text().splitlines()]
        assert sorted((Path(s["input"]).name, s["reason"]) for s in skipped) == [
            ("gone.jpg", "missing"), ("locked", "unreadable")
        ]  # fmt: skip
        assert (tmp_path / "amg" / "ok.json").is_file()

        run("blur", str(photos), "--out", str(tmp_path / "blur"))
        report = json.loads((tmp_path / "blur" / "report.json").read_text())
        assert sorted((s["file"], s["reason"]) for s in report["skipped"]) == [
            ("gone.jpg", "missing"), ("locked", "unreadable")
        ]  # fmt: skip
        assert report["images"] == 1
    finally:
        (photos / "locked").chmod(0o755)


def test_a_damaged_store_file_is_named_in_one_line(tmp_path, demo_photos):
    """store.json overwritten, a manifest part cut short: `status` (any command) names the file
    and what to do, in one line (it was json's "Expecting value" naming no file, or pyarrow's
    traceback)."""
    from typer.testing import CliRunner

    from engine.cli.main import app

    for damage in ("store.json", "manifest"):
        store = Store.create(tmp_path / damage)
        ingest(str(demo_photos[0].parent), store, shard_size=2)
        if damage == "store.json":
            path = store.root / "store.json"
            path.write_text("garbage")
        else:
            (path,) = (store.root / "manifest").glob("part-*.parquet")
            path.write_bytes(path.read_bytes()[:100])
        result = CliRunner().invoke(app, ["status", str(store.root)])
        assert result.exit_code == 1, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error: ") and str(path) in line and "is damaged" in line
        assert "restore it from a backup" in line


def test_status_keeps_an_entry_whose_name_holds_a_newline_on_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "two\nlines.jpg").write_text("not a JPEG")
    (tmp_path / "src" / "ok.png").write_bytes(_save(Image.new("RGB", (64, 64)), "PNG"))
    store = Store.create(tmp_path / "store")
    ingest(str(tmp_path / "src"), store)
    (line,) = [line for line in status_lines(store) if line.startswith("  quarantined")]
    assert "two\\nlines.jpg: not_an_image (" in line and "\n" not in line
