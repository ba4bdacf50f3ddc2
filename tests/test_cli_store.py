"""`sa-engine ingest/status/export/verify` end to end with CliRunner on real photos."""

import json
import tarfile

import pytest
from pycocotools.coco import COCO
from typer.testing import CliRunner

from engine.cli.main import app
from sharding.runner import run_stage
from sharding.store import Store
from store_helpers import blur_stage, classical_stage

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_round_trip_on_demo_photos(tmp_path, demo_photos):
    store, rel = tmp_path / "store", tmp_path / "release"
    result = _invoke(
        "ingest", demo_photos[0].parent, "--store", store, "--shard-size", 2, "--commit-shards", 1
    )
    assert result.exit_code == 0, result.output
    assert "4 added in 2 new shards" in result.output and "ignored 1 non-image" in result.output
    assert len(list((store / "manifest").glob("part-*.parquet"))) == 2  # a commit a shard
    assert "ingest: files 4/4 | added 4 | unchanged 0 | duplicates 0 | quarantined 0" in result.output
    again = _invoke("ingest", f"file://{demo_photos[0].parent}", "--store", store)
    assert "0 added" in again.output and "4 already in the store" in again.output

    result = _invoke("export", "sa1b", store, "--out", rel)
    assert result.exit_code == 1 and "no stage has finished every shard" in result.output
    run_stage(Store(store), "classical", 0, classical_stage)
    result = _invoke("export", "sa1b", store, "--out", rel)
    assert (
        result.exit_code == 1
        and "no privacy output" in result.output
        and "unblurred" in result.output
    )
    run_stage(Store(store), "privacy", 0, blur_stage)

    status = _invoke("status", store)
    assert status.exit_code == 0
    assert "classical round 0: 2/2 shards done, 4 images" in status.output
    assert (
        "privacy round 0: 2/2 shards done, 4 images, 0 annotations, 0 quarantined, 4 output images"
        in status.output
    )
    figures = json.loads(_invoke("status", store, "--json").output)  # the same, for scripts
    assert (figures["images"], figures["shards"], figures["ingest"]) == (4, 2, {})
    stages = {(s["stage"], s["round"]): s for s in figures["stages"]}
    assert stages[("classical", 0)]["complete"] and stages[("classical", 0)]["images"] == 4
    assert stages[("privacy", 0)]["output_images"] == 4

    result = _invoke("export", "sa1b", store, "--out", rel, "--stage", "classical", "--round", 0)
    assert result.exit_code == 0, result.output
    assert "2 tars, 4 images" in result.output
    assert "export sa1b: tars 1/2 | images 2 |" in result.output  # a progress line per tar
    assert "export sa1b: tars 2/2 | images 4 |" in result.output
    with tarfile.open(rel / "sa_000001.tar") as tar:
        assert tar.getnames() == ["sa_3.jpg", "sa_3.json", "sa_4.jpg", "sa_4.json"]
    assert _invoke("verify", rel).exit_code == 0
    (rel / "sa_000001.tar").write_bytes((rel / "sa_000001.tar").read_bytes()[:3000])
    broken = _invoke("verify", rel)
    assert broken.exit_code == 1 and "sa_000001.tar/sa_4.json: missing" in broken.output
    again = _invoke("export", "sa1b", store, "--out", rel, "--stage", "classical", "--round", 0)
    assert "2 tars (1 kept from an earlier export)" in again.output  # the cut tar is made anew
    assert _invoke("verify", rel).exit_code == 0

    result = _invoke("export", "coco", store, "--out", tmp_path / "coco.json")
    assert result.exit_code == 0 and COCO(str(tmp_path / "coco.json")).getAnnIds()
    # the COCO export's frame is the release's: the export: block, as for the SA-1B tars
    frames = {}
    for short_side in ("200", "0"):
        out = tmp_path / f"coco-{short_side}.json"
        result = _invoke("export", "coco", store, "--out", out, "--set", f"export.short_side={short_side}")
        assert result.exit_code == 0, result.output
        frames[short_side] = {i["id"]: min(i["width"], i["height"]) for i in COCO(str(out)).dataset["images"]}
    assert set(frames["200"].values()) == {200} and min(frames["0"].values()) > 200
    result = _invoke("export", "parquet", store, "--out", tmp_path / "pq")
    assert result.exit_code == 0 and (tmp_path / "pq" / "images.parquet").is_file()

    # an output changed after its commit (same size): the default status compares sizes, as runs
    # do; --verify re-hashes, finds it and sets its record aside for the next run
    changed = store / "stages" / "classical" / "round-0" / "shard-000001.annotations.parquet"
    data = bytearray(changed.read_bytes())
    data[100] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert "classical round 0: 2/2 shards done" in _invoke("status", store).output
    verified = _invoke("status", store, "--verify")
    assert verified.exit_code == 1  # a script can tell: a shard waits to be redone
    assert "classical round 0: 1/2 shards done" in verified.output and "1 set aside" in verified.output
    assert "1 set aside" in _invoke("status", store, "--quick").output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["ingest", "{tmp}/nowhere", "--store", "{tmp}/s"],
            "does not exist: pass a folder, a glob",
        ),
        (
            ["ingest", "{demo}", "--store", "{tmp}/s", "--shard-size", "0"],
            "ingest.shard_size=0 is invalid",
        ),
        (["ingest", "{demo}", "--store", "{tmp}/s", "--threads", "0"], "ingest.threads=0 is invalid"),
        (
            ["ingest", "{demo}", "--store", "{tmp}/s", "--commit-shards", "0"],
            "ingest.commit_shards=0 is invalid: use a positive number of new shards per commit",
        ),
        (
            ["ingest", "{demo}", "--store", "{tmp}/s", "--set", "ingest.chunk=0"],
            "ingest.chunk=0 is invalid: use a positive number of files",
        ),
        (
            ["ingest", "{demo}", "--store", "{tmp}/s", "--set", "ingest.chunks=8"],
            "config block 'ingest' has unknown keys ['chunks']",
        ),
        (
            ["export", "sa1b", "{tmp}", "--out", "{tmp}/r", "--short-side", "-1"],
            "export.short_side=-1 is invalid: use a number of pixels >= 0",
        ),
        (
            ["export", "sa1b", "{tmp}", "--out", "{tmp}/r", "--set", "export.cpu=2"],
            "config block 'export' has unknown keys ['cpu']",
        ),
        (["status", "{tmp}"], "is not a store (no store.json): run `sa-engine ingest"),
        (["export", "coco", "{tmp}", "--out", "{tmp}/c.json"], "is not a store"),
        (["verify", "{tmp}/none"], "does not exist: pass the --out folder"),
        (["verify", "{tmp}"], "SHA256SUMS: missing"),
        (
            ["export", "coco", "{demo}", "--out", "{tmp}"],
            "is a folder: pass the path of the JSON file",
        ),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, demo_photos, args, message):
    args = [a.format(tmp=tmp_path, demo=demo_photos[0].parent) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and message in result.output


def test_cli_ingest_real_photos(tmp_path, shared_data_dir):
    photos = shared_data_dir / "images" / "coco"
    result = _invoke("ingest", photos, "--store", tmp_path / "store", "--shard-size", 16)
    assert result.exit_code == 0, result.output
    manifest = Store(tmp_path / "store").manifest()
    count = len(list(photos.glob("*.jpg")))
    assert manifest.num_rows + Store(tmp_path / "store").ingest_quarantine().num_rows == count
    assert len(Store(tmp_path / "store").shards()) == -(-manifest.num_rows // 16)
    assert json.loads((tmp_path / "store" / "store.json").read_text())["min_side"] == 32


def test_ingest_progress_lines_in_a_log(tmp_path, demo_photos):
    """Not on a terminal (a log, CI): one line every `every` files and one at the end, with what
    became of the files so far."""
    import io

    from sharding.manifest import ingest
    from stages.progress import IngestProgress

    folder = tmp_path / "src"
    folder.mkdir()
    for p in demo_photos[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "copy.jpg").write_bytes(demo_photos[0].read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    log = io.StringIO()
    progress = IngestProgress(stream=log, every=2)
    ingest(str(folder), Store.create(tmp_path / "store"), on_file=progress.update)
    lines = log.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "ingest: files 2/5", "ingest: files 4/5", "ingest: files 5/5"
    ]
    assert "| added 3 | unchanged 0 | duplicates 1 | quarantined 1 |" in lines[-1]
    assert lines[-1].endswith("files/s")
