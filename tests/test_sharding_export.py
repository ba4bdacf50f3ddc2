"""Release export: SA-1B tars from blurred images only, checksums and verify, COCO and Parquet."""

import hashlib
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from engine import rle
from engine.image_io import load_image
from sharding.export_coco import export_coco, export_parquet
from sharding.export_sa1b import export_sa1b
from sharding.manifest import ingest
from sharding.runner import run_stage
from sharding.store import Store
from sharding.verify import verify_release
from store_helpers import blur_stage, classical_stage


@pytest.fixture()
def annotated(tmp_path, demo_photos):
    store = Store.create(tmp_path / "store")
    ingest(str(demo_photos[0].parent), store, shard_size=2)
    run_stage(store, "classical", 0, classical_stage)
    return store


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_unblurred_images_never_reach_the_release(annotated, tmp_path):
    with pytest.raises(ValueError, match="no privacy output"):
        export_sa1b(annotated, tmp_path / "rel")
    run_stage(annotated, "privacy", 0, blur_stage, shards=["shard-000000"])
    with pytest.raises(ValueError, match="shard-000001 have no privacy output.*--allow-partial"):
        export_sa1b(annotated, tmp_path / "rel")
    assert not (tmp_path / "rel").exists()  # refused before writing anything
    report = export_sa1b(annotated, tmp_path / "rel", allow_partial=True)
    assert (
        report.tars == ["sa_000000.tar"]
        and "never released unblurred" in report.skipped_shards["shard-000001"]
    )
    members = _members(tmp_path / "rel" / "sa_000000.tar")
    assert sorted(members) == ["sa_1.jpg", "sa_1.json", "sa_2.jpg", "sa_2.json"]
    originals = {
        row.image_id: row for shard in annotated.shards() for row in annotated.iter_shard(shard)
    }
    blurred = {i: data for i, data, _ in annotated.iter_output_images("privacy", 0, "shard-000000")}
    every_original = {hashlib.sha256(r.data).hexdigest() for r in originals.values()}
    for image_id in (1, 2):
        released = members[f"sa_{image_id}.jpg"]
        assert hashlib.sha256(released).hexdigest() not in every_original
        assert released == blurred[image_id]  # smaller than 1500 px: not upscaled, not re-encoded
        original = load_image(originals[image_id].data).astype(int)
        assert (
            np.abs(load_image(released).astype(int) - original).mean() > 3
        )  # it is the blurred one


def test_an_output_changed_after_its_commit_is_never_released_and_is_redone(annotated, tmp_path):
    """The export re-hashes what it releases: a changed annotations file (same size) keeps its
    shard out, with the reason, and sets its record aside so the next run redoes the shard."""
    run_stage(annotated, "privacy", 0, blur_stage)
    path = annotated.output_path("classical", 0, "shard-000001", "annotations")
    original = path.read_bytes()
    changed = bytearray(original)
    changed[100] ^= 0xFF
    path.write_bytes(bytes(changed))
    report = export_sa1b(annotated, tmp_path / "rel", stage="classical")
    assert report.tars == ["sa_000000.tar"]
    assert "failed its sha256 check" in report.skipped_shards["shard-000001"]
    assert run_stage(annotated, "classical", 0, classical_stage).processed == ["shard-000001"]
    assert path.read_bytes() == original
    assert export_sa1b(annotated, tmp_path / "rel2").tars == ["sa_000000.tar", "sa_000001.tar"]
    # release.json names the run that made each released shard: the redo made shard-000001
    made_by = [
        json.loads((tmp_path / rel / "release.json").read_text())["made_by"]["annotations"]
        for rel in ("rel", "rel2")
    ]
    assert [run["shards"] for run in made_by[0]] == [["shard-000000"]]
    assert [run["shards"] for run in made_by[1]] == [["shard-000000"], ["shard-000001"]]
    assert made_by[1][0]["run_record"] == made_by[0][0]["run_record"]
    assert made_by[1][0]["started_at"] < made_by[1][1]["started_at"]


def test_sa1b_layout_and_rescaled_annotations(annotated, tmp_path):
    run_stage(annotated, "privacy", 0, blur_stage)
    report = export_sa1b(annotated, tmp_path / "rel", short_side=200)
    assert report.tars == ["sa_000000.tar", "sa_000001.tar"] and report.images == 4
    release = json.loads((tmp_path / "rel" / "release.json").read_text())
    for made_by in release["made_by"].values():  # annotations and privacy: one run each here
        (run,) = made_by
        assert run["shards"] == ["shard-000000", "shard-000001"]
        assert (annotated.root / run["run_record"]).is_file()
        assert run["versions"]["sa-engine"] == release["exported_with"]["sa-engine"]
    members = _members(tmp_path / "rel" / "sa_000000.tar")
    record = json.loads(members["sa_1.json"])
    assert set(record) == {"image", "annotations"}
    assert record["image"] == {
        "image_id": 1, "width": 200, "height": 200, "file_name": "sa_1.jpg",
        "blurred": {"faces": 0, "plates": 0},  # the privacy output's counts (blur_stage: none)
    }  # fmt: skip
    assert load_image(members["sa_1.jpg"]).shape == (200, 200, 3)
    chelsea = json.loads(members["sa_2.json"])["image"]
    assert (chelsea["width"], chelsea["height"]) == (301, 200)  # 451x300 -> short side 200
    original = {
        m["id"]: m for m in annotated.read_annotations("classical", 0, "shard-000000").to_pylist()
    }
    for ann in record["annotations"]:
        assert set(ann) == {
            "id",
            "segmentation",
            "bbox",
            "area",
            "predicted_iou",
            "stability_score",
            "crop_box",
            "point_coords",
        }
        mask = rle.decode(ann["segmentation"])
        assert mask.shape == (200, 200) and int(mask.sum()) == ann["area"]
        # SAM's box, as unresized records have it (one less in w, h than COCO's tight box)
        assert ann["bbox"] == pytest.approx(list(rle.sam_bbox_xywh([ann["segmentation"]])[0]))
        assert ann["bbox"][2:] == pytest.approx(list(rle.bbox_xywh([ann["segmentation"]])[0][2:] - 1))
        src = original[ann["id"]]
        assert ann["area"] == pytest.approx(src["area"] * (200 / 512) ** 2, rel=0.15, abs=30)
        assert ann["point_coords"][0] == pytest.approx(
            [v * 200 / 512 for v in src["point_coords"][0]]
        )
        assert ann["crop_box"] == pytest.approx([0, 0, 200, 200])


def test_rescaled_masks_stay_centred_and_keep_one_box_convention():
    """Downscaling a mask samples each block's centre (INTER_NEAREST_EXACT, as the area-resized
    image is centred), not its top-left pixel; bbox keeps SAM's convention; a mask that keeps no
    pixel is dropped."""
    from engine.records import ImageMeta, ImageRecord, MaskRecord
    from sharding.rescale import rescale_record

    def record(mask):
        (seg,) = rle.encode(mask)
        box = [float(v) for v in rle.sam_bbox_xywh([seg])[0]]
        return MaskRecord(0, seg, box, int(mask.sum()), 0.9, 0.9, [0, 0, 400, 400], [[10.0, 10.0]])

    square = np.zeros((400, 400), bool)
    square[101:199, 101:199] = True  # centre (149.5, 149.5) -> (37.375, 37.375) at a quarter
    line = np.zeros((400, 400), bool)
    line[1, :] = True  # one row, between the rows a 4x downscale samples (2, 6, ...: the centres)
    image = ImageRecord(ImageMeta(1, 400, 400, "x"), [record(square), record(line)])
    released = rescale_record(image, 100, 100)
    (kept,) = released.annotations  # the line keeps no pixel: dropped
    small = rle.decode(kept.segmentation)
    ys, xs = np.nonzero(small)
    assert (ys.mean(), xs.mean()) == pytest.approx((149.5 / 4 - 0.375,) * 2, abs=0.1)  # NEAREST: +0.5
    assert kept.bbox == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    assert kept.area == int(small.sum())


def test_verify_names_corrupt_and_missing_members(annotated, tmp_path):
    run_stage(annotated, "privacy", 0, blur_stage)
    rel = tmp_path / "rel"
    export_sa1b(annotated, rel)
    assert verify_release(rel) == []
    sums = (rel / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 2 and sums[0].endswith("  sa_000000.tar")
    assert sums[0].split()[0] == hashlib.sha256((rel / "sa_000000.tar").read_bytes()).hexdigest()
    tar0 = (rel / "sa_000000.tar").read_bytes()
    with tarfile.open(rel / "sa_000000.tar") as tar:
        info = tar.getmember("sa_2.jpg")
    corrupt = bytearray(tar0)
    corrupt[info.offset_data + 50] ^= 0xFF
    (rel / "sa_000000.tar").write_bytes(bytes(corrupt))
    (rel / "sa_000001.tar").unlink()
    problems = verify_release(rel)
    assert "sa_000000.tar: checksum mismatch (corrupt or changed)" in problems
    assert "sa_000000.tar/sa_2.jpg: corrupt (size or sha256 differs)" in problems
    assert not any("sa_1.jpg" in p or "sa_2.json" in p for p in problems)
    assert "sa_000001.tar: missing" in problems
    assert {"sa_000001.tar/sa_3.jpg: missing", "sa_000001.tar/sa_4.json: missing"} <= set(problems)
    (rel / "sa_000009.tar").write_bytes(b"")
    assert "sa_000009.tar: not listed in SHA256SUMS or MEMBERS.tsv (stray file)" in verify_release(
        rel
    )
    export_sa1b(annotated, rel)  # re-export into the release: intact again, stray tar removed
    assert verify_release(rel) == [] and not (rel / "sa_000009.tar").exists()


def test_coco_export_loads_in_pycocotools(annotated, tmp_path):
    counts = export_coco(annotated, tmp_path / "coco.json", short_side=0)
    assert counts["images"] == 4 and counts["annotations"] > 0
    coco = COCO(str(tmp_path / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["object"]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[3]))[0]
    assert ann["iscrowd"] == 0 and ann["category_id"] == 1
    for a in coco.loadAnns(coco.getAnnIds()):  # COCO's tight box, not the records' SAM box
        assert a["bbox"] == list(rle.bbox_xywh([a["segmentation"]])[0])
    assert "blurred" not in coco.loadImgs([3])[0]  # no privacy output yet
    mask = coco.annToMask(ann)
    assert mask.shape == (400, 600) and int(mask.sum()) == ann["area"]
    assert coco.loadImgs([3])[0]["file_name"] == "sa_3.jpg"
    resized = export_coco(
        annotated, tmp_path / "coco1500.json"
    )  # default release frame: no upscale
    assert resized["annotations"] == counts["annotations"]
    run_stage(annotated, "privacy", 0, blur_stage)
    export_coco(annotated, tmp_path / "coco.json", short_side=0)
    images = json.loads((tmp_path / "coco.json").read_text())["images"]
    assert [i["blurred"] for i in images] == [{"faces": 0, "plates": 0}] * 4


def test_parquet_tables_and_source_selection(annotated, tmp_path, demo_photos):
    later = Store(annotated.root)
    run_stage(later, "gear", 2, lambda row, rgb: classical_stage(row, rgb[:, :, ::-1].copy()))
    stale = tmp_path / "pq" / "annotations" / "shard-000099.parquet"  # another store's export
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"PAR1")
    counts = export_parquet(later, tmp_path / "pq")  # default: the latest completed output
    assert not stale.exists()  # read as a dataset, the folder is this export alone
    assert (counts["stage"], counts["round"]) == ("gear", 2)
    table = pq.read_table(tmp_path / "pq" / "annotations" / "shard-000000.parquet")
    assert {
        "image_id",
        "id",
        "bbox",
        "area",
        "predicted_iou",
        "stability_score",
        "rle_counts",
        "rle_size",
        "stage",
        "round",
    } <= set(table.schema.names)
    assert set(table.column("round").to_pylist()) == {2}
    images = pq.read_table(tmp_path / "pq" / "images.parquet").to_pylist()
    assert [i["file_name"] for i in images] == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg", "sa_4.jpg"]
    chosen = export_parquet(later, tmp_path / "pq0", stage="classical")
    assert (chosen["stage"], chosen["round"]) == ("classical", 0)
    with pytest.raises(ValueError, match="no finished shards"):
        export_parquet(later, tmp_path / "pq1", stage="classical", round_=5)


def test_an_image_the_privacy_stage_failed_on_is_not_released(annotated, tmp_path):
    def privacy(row, rgb):
        if row.image_id == 2:
            raise RuntimeError("face detector failed")
        return blur_stage(row, rgb)

    run_stage(annotated, "privacy", 0, privacy)
    report = export_sa1b(annotated, tmp_path / "rel")
    assert "no image" in report.skipped_images[2] and report.images == 3
    assert sorted(_members(tmp_path / "rel" / "sa_000000.tar")) == ["sa_1.jpg", "sa_1.json"]
    release = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert release["skipped_images"] == {"2": report.skipped_images[2]}


def test_a_stopped_export_goes_on_from_the_tars_it_wrote(annotated, tmp_path, monkeypatch):
    """An export that stops after its first tar keeps it: run again, it reuses that tar (the same
    inputs, its bytes still matching their sha256) and writes the rest, ending with the release
    an export that never stopped makes; other settings make every tar anew."""
    import sharding.export_sa1b as export

    run_stage(annotated, "privacy", 0, blur_stage)
    clean = export_sa1b(annotated, tmp_path / "clean")
    write_tar = export._write_tar

    def stop_at_the_second(store, path, *args):
        if path.name == "sa_000001.tar":
            raise KeyboardInterrupt  # the export is stopped here
        return write_tar(store, path, *args)

    monkeypatch.setattr(export, "_write_tar", stop_at_the_second)
    rel = tmp_path / "rel"
    with pytest.raises(KeyboardInterrupt):
        export_sa1b(annotated, rel)
    assert sorted(p.name for p in rel.iterdir()) == [".export", "sa_000000.tar"]
    monkeypatch.setattr(export, "_write_tar", write_tar)
    first = (rel / "sa_000000.tar").stat().st_mtime_ns
    report = export_sa1b(annotated, rel)
    assert report.reused == ["sa_000000.tar"] and (rel / "sa_000000.tar").stat().st_mtime_ns == first
    assert (report.tars, report.images) == (clean.tars, clean.images)
    assert report.annotations == clean.annotations
    for name in ("sa_000000.tar", "sa_000001.tar", "MEMBERS.tsv", "SHA256SUMS"):
        assert (rel / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert verify_release(rel) == []
    assert export_sa1b(annotated, rel).reused == clean.tars  # nothing changed: nothing rewritten
    assert export_sa1b(annotated, rel, short_side=200).reused == []  # another frame: all anew


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    """A store, a release or a checkpoint is read by other users and nodes: every file the engine
    writes atomically gets the mode open() would give it (they were all owner-only)."""
    import os

    from engine.atomic import atomic_write_bytes

    before = os.umask(0o022)
    os.umask(before)
    atomic_write_bytes(tmp_path / "SHA256SUMS", b"x")
    assert (tmp_path / "SHA256SUMS").stat().st_mode & 0o777 == 0o666 & ~before
