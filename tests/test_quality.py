"""The dataset quality report on real photos: its figures against the masks decoded one by one."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from engine import rle
from engine.cli.main import app
from engine.classical import classical_masks
from engine.quality import FINE_BINS, QualityConfig, Tally, concavity, format_table, quality_rows
from sharding.manifest import ingest
from sharding.runner import StageResult, run_stage
from sharding.store import Store
from store_helpers import classical_stage


def with_a_copy(row, rgb):
    """The classical masks and a copy of the largest one, slightly grown: a near-duplicate."""
    masks = classical_masks(rgb)
    largest = max(masks, key=lambda m: m.area)
    grown = rle.decode(largest.segmentation)
    ys, xs = np.nonzero(grown)
    grown[ys[0], max(xs[0] - 1, 0)] = True
    copy = dataclasses.replace(
        largest, id=len(masks), segmentation=rle.encode(grown)[0], area=int(grown.sum())
    )
    return StageResult(masks=masks + [copy])


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_photos):
    store = Store.create(tmp_path_factory.mktemp("quality") / "store")
    ingest(str(demo_photos[0].parent), store, shard_size=2)
    run_stage(store, "classical", 0, classical_stage)
    run_stage(store, "copies", 0, with_a_copy)
    return store


def decoded(store, stage):
    """image_id -> (masks HxW bool, predicted IoUs) of every finished shard, decoded one by one."""
    out = {}
    for shard in store.shards():
        rows = store.read_annotations(stage, 0, shard).to_pylist()
        for image_id in store.done_record(stage, 0, shard)["images"]:
            mine = [r for r in rows if r["image_id"] == image_id]
            masks = [rle.decode({"size": r["rle_size"], "counts": r["rle_counts"]}) for r in mine]
            out[image_id] = (masks, [r["predicted_iou"] for r in mine])
    return out


def near_duplicates(masks, threshold):
    with_one = pairs = 0
    for i, a in enumerate(masks):
        found = False
        for j, b in enumerate(masks):
            if i != j and (a & b).sum() / (a | b).sum() >= threshold:
                found = True
                pairs += j > i
        with_one += found
    return with_one, pairs


def test_figures_match_the_masks_decoded_one_by_one(store):
    rows = {row.stage: row for row in quality_rows(store)}
    assert list(rows) == ["classical", "copies"]
    for stage, row in rows.items():
        images = decoded(store, stage)
        masks = [m for ms, _ in images.values() for m in ms]
        counts = sorted(len(ms) for ms, _ in images.values())
        assert (row.shards, row.shards_read, row.images, row.masks) == (2, 2, 4, len(masks))
        assert row.masks_per_image == pytest.approx(len(masks) / 4)
        assert row.masks_per_image_median == np.median(counts)  # the mean of the middle two
        assert sum(row.masks_per_image_bins.values()) == pytest.approx(1.0)
        sizes = np.sqrt([m.sum() / m.size for m in masks])
        for got, q in [(row.relative_size_p10, 0.1), (row.relative_size_median, 0.5),
                       (row.relative_size_p90, 0.9)]:  # fmt: skip
            exact = np.sort(sizes)[int(np.ceil(q * len(sizes))) - 1]
            assert exact <= got <= exact + 1 / FINE_BINS + 1e-12
        assert row.relative_size_bins["0-0.05"] == pytest.approx((sizes < 0.05).mean())
        ious = [v for _, vs in images.values() for v in vs]
        assert row.predicted_iou_mean == pytest.approx(np.mean(ious))
        assert sum(row.predicted_iou_bins.values()) == pytest.approx(1.0)
        assert sum(row.stability_bins.values()) == pytest.approx(1.0)
        below_half = np.mean(np.clip(ious, 0, 1) < 0.5)
        assert row.predicted_iou_bins["0-0.5"] == pytest.approx(below_half)
        assert row.whole_image == pytest.approx(np.mean([m.mean() >= 0.95 for m in masks]))
        assert np.asarray(row.centres).sum() == len(masks)
        assert row.concavity_masks == len(masks)  # fewer than 100 a shard: every one
        ys = [np.nonzero(m) for m in masks]
        exact = sorted(concavity(m, [x.min(), y.min(), x.max() - x.min() + 1, y.max() - y.min() + 1])
                       for m, (y, x) in zip(masks, ys))  # fmt: skip
        median = exact[int(np.ceil(0.5 * len(exact))) - 1]
        assert median <= row.concavity_median <= median + 1 / FINE_BINS + 1e-12
        with_one = pairs = 0
        for ms, _ in images.values():
            a, b = near_duplicates(ms, 0.9)
            with_one, pairs = with_one + a, pairs + b
        assert row.near_duplicates == pytest.approx(with_one / len(masks))
        assert row.near_duplicate_pairs == pairs
    assert rows["copies"].near_duplicate_pairs >= 4  # at least the copy in each image
    assert rows["classical"].near_duplicate_pairs < rows["copies"].near_duplicate_pairs
    table = format_table(list(rows.values()))
    assert "near-dup." in table and "copies" in table


def test_a_sample_of_shards_and_one_stage(store):
    (row,) = quality_rows(
        store, QualityConfig(stage="copies", every=2, duplicate_iou=0, concavity_masks=5)
    )
    assert (row.stage, row.shards, row.shards_read, row.images) == ("copies", 2, 1, 2)
    assert row.concavity_masks == 5 < row.masks
    assert row.near_duplicates is None and row.near_duplicate_pairs is None


def test_bad_settings_and_missing_outputs_are_named(store, tmp_path):
    with pytest.raises(ValueError, match="quality.every=0"):
        QualityConfig(every=0)
    with pytest.raises(ValueError, match="quality.duplicate_iou=1.5"):
        QualityConfig(duplicate_iou=1.5)
    with pytest.raises(ValueError, match="quality.concavity_masks=-1"):
        QualityConfig(concavity_masks=-1)
    with pytest.raises(ValueError, match="quality.round needs quality.stage"):
        QualityConfig(round=0)
    with pytest.raises(ValueError, match="no finished annotation shards of auto.*sa-engine run auto"):
        quality_rows(store, QualityConfig(stage="auto"))
    empty = Store.create(tmp_path / "empty")
    with pytest.raises(ValueError, match="no finished annotation shards"):
        quality_rows(empty)


def test_cli_prints_the_table_and_writes_the_report(store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["quality", str(store.root), "--stage", "copies",
                                 "--out", str(tmp_path / "q")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "copies" in result.output and "classical" not in result.output
    rows = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert [r["stage"] for r in rows] == ["copies"] and rows[0]["near_duplicate_pairs"] >= 4
    png = (tmp_path / "q" / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    result = runner.invoke(app, ["quality", str(store.root), "--set", "quality.every=-1"])
    assert result.exit_code == 1 and "quality.every=-1 is invalid" in result.output
    result = runner.invoke(app, ["quality", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "error:" in result.output


def test_concavity_of_known_shapes():
    square = np.zeros((120, 140), bool)
    square[10:110, 20:120] = True
    assert concavity(square, [20, 10, 100, 100]) == 0.0
    ring = square.copy()
    ring[30:90, 40:100] = False  # the hull of a ring is its filled square
    assert concavity(ring, [20, 10, 100, 100]) == pytest.approx(3600 / 10000)
    corner = np.zeros((50, 50), bool)
    corner[0:40, 0:10] = corner[30:40, 0:40] = True  # an L: its hull adds the triangle between
    assert 0.3 < concavity(corner, [0, 0, 40, 40]) < 0.5
    assert np.isnan(concavity(np.zeros((5, 5), bool), [0, 0, 0, 0]))


def test_on_ray_the_figures_are_the_local_ones(store, local_ray, tmp_path):
    """A task per shard on a real (embedded) Ray; the tallies summed in shard order give the
    one-process figures to the last bit."""
    from stages.quality import RayQuality

    config = QualityConfig(concavity_masks=7)
    assert quality_rows(store, config, cluster=RayQuality()) == quality_rows(store, config)
    result = CliRunner().invoke(
        app, ["quality", str(store.root), "--ray", "--stage", "copies", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "q" / "quality.json").read_text())
    (local,) = quality_rows(store, QualityConfig(stage="copies"))
    assert row == dataclasses.asdict(local)
    result = CliRunner().invoke(app, ["quality", str(store.root), "--ray", "--set", "quality.cpus=0"])
    assert result.exit_code == 1 and "quality.cpus=0 is invalid" in result.output


@pytest.mark.parametrize("counts", [[11, 5, 12, 0, 15, 18], [3, 1, 2], [4], [0, 0, 7, 7]])
def test_masks_per_image_median_is_the_usual_median(counts):
    tally = Tally(duplicate_iou=0.0, concavity_masks=0)
    tally.per_image = np.bincount(counts)  # images by mask count
    tally.masks = sum(counts)
    assert tally.row("auto", 0, 1, 1).masks_per_image_median == np.median(counts)
