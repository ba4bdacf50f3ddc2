"""Ingest on Ray (`stages.ingest.RayIngest`, `sa-engine ingest --ray`): the same store, byte for
byte, as the local ingest, on real photos with a copy, a broken file and a dangling link among
them; and a source that changes between the two reads commits nothing."""

import shutil

import pytest
from typer.testing import CliRunner

from engine.cli.main import app
from sharding.manifest import ingest
from sharding.store import Store
import stages.ingest
from stages.ingest import RayIngest

pytestmark = pytest.mark.slow


def _files(root):
    """Every committed table (store.json and the run records say when and where)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*.parquet"))
        if not p.name.startswith(".")
    }


def _source(folder, photos):
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    shutil.copy(photos[0], folder / "z_copy.jpg")  # a duplicate: one id, recorded once
    (folder / "broken.jpg").write_bytes(b"not an image")  # quarantined: decode
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")  # quarantined: unreadable
    return folder


def test_ray_ingest_matches_the_local_one(tmp_path, local_ray, demo_photos, monkeypatch):
    src = _source(tmp_path / "src", demo_photos[:2])
    local, on_ray = Store.create(tmp_path / "local"), Store.create(tmp_path / "ray")
    expected = ingest(str(src), local, shard_size=1, commit_shards=1)
    report = ingest(str(src), on_ray, shard_size=1, commit_shards=1, cluster=RayIngest(chunk=2))
    assert report == expected
    assert (report.added, report.duplicates, report.quarantined) == (2, 1, 2)
    assert _files(on_ray.root) == _files(local.root)
    # a commit a shard, and one for the copy met after them (z_copy.jpg sorts last)
    assert len(list((on_ray.root / "manifest").glob("part-*.parquet"))) == 3

    # the source grows: the next ids and shards, as locally; nothing else is read again
    for p in demo_photos[2:]:
        shutil.copy(p, src / p.name)
    expected = ingest(str(src), local, shard_size=1, skip_known=True)
    report = ingest(str(src), on_ray, shard_size=1, skip_known=True, cluster=RayIngest(chunk=2))
    assert report == expected and report.added == len(demo_photos) - 2
    # every listed file in one count (the unreadable link: quarantined before, so unchanged)
    assert report.listed == report.added + report.unchanged + report.duplicates + report.quarantined
    assert _files(on_ray.root) == _files(local.root)
    assert on_ray.manifest().column("image_id").to_pylist() == list(range(1, len(demo_photos) + 1))

    # from the shell, on the Ray this process is connected to; a listing longer than the tasks
    # allowed (2 here) gets larger chunks
    monkeypatch.setattr(stages.ingest, "MAX_SCAN_TASKS", 2)
    result = CliRunner().invoke(
        app, ["ingest", str(src), "--store", str(tmp_path / "cli"), "--ray", "--shard-size", "1",
              "--set", "ingest.chunk=1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"listed {len(demo_photos) + 3} files: {len(demo_photos)} added" in result.output
    ingest(str(src), Store.create(tmp_path / "at_once"), shard_size=1)
    assert _files(tmp_path / "cli") == _files(tmp_path / "at_once")


class _ChangingSource(RayIngest):
    """Rewrites a file after the scan, before the shards are written (a source edited meanwhile)."""

    def __init__(self, path, **kw):
        super().__init__(**kw)
        self.path = path

    def write_shards(self, store, plan, shards):
        self.path.write_bytes(self.path.read_bytes() + b"\0")
        super().write_shards(store, plan, shards)


def _two_photos(tmp_path, demo_photos):
    """(source folder of two photos, the second's path, an empty store)."""
    src = tmp_path / "src"
    src.mkdir()
    for p in demo_photos[:2]:
        shutil.copy(p, src / p.name)
    return src, src / demo_photos[1].name, Store.create(tmp_path / "store")


def test_a_source_changed_between_the_reads_commits_nothing(tmp_path, local_ray, demo_photos):
    src, changed, store = _two_photos(tmp_path, demo_photos)
    with pytest.raises(ValueError, match=f"{changed} changed while it was ingested"):
        ingest(str(src), store, shard_size=1, cluster=_ChangingSource(changed))
    assert store.manifest().num_rows == 0 and not list((store.root / "manifest").glob("*.parquet"))
    report = ingest(str(src), store, shard_size=1, cluster=RayIngest())  # a re-run hashes it anew
    assert report.added == 2 and store.shards() == ["shard-000000", "shard-000001"]


def test_a_source_changed_after_a_commit_keeps_the_commit(tmp_path, local_ray, demo_photos):
    """Commits a shard at a time: the second photo changes before its part's shard is written;
    the first part stays committed, and a re-run adds the second photo as it is now."""
    src, changed, store = _two_photos(tmp_path, demo_photos)
    with pytest.raises(ValueError, match="nothing since the ingest's last commit was committed"):
        ingest(str(src), store, shard_size=1, commit_shards=1, cluster=_ChangingSource(changed))
    assert store.manifest().column("source").to_pylist() == [(src / demo_photos[0].name).as_uri()]
    report = ingest(str(src), store, shard_size=1, commit_shards=1, cluster=RayIngest())
    assert (report.added, report.unchanged) == (1, 1)
    assert store.shards() == ["shard-000000", "shard-000001"]
    assert store.manifest().column("image_id").to_pylist() == [1, 2]
