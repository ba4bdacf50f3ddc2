"""Ingest: stable ids, dedup, deterministic shards, every source kind through fsspec."""

import hashlib
import json
import shutil

import fsspec
import pytest

from sharding.manifest import ingest
from sharding.sources import list_source
from sharding.status import status_lines
from sharding.store import INDEX_COLUMNS, Store
from store_helpers import synthetic_photos


def _files(root):
    """Every file of a store but its run records and lock files (a killed writer's temporary
    `.*.tmp` files count: the next ingest removes them)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "runs" not in p.parts and p.suffix != ".lock"
    }


def test_ingest_folder_ids_manifest_and_original_bytes(tmp_path, demo_photos):
    store = Store.create(tmp_path / "store")
    report = ingest(str(demo_photos[0].parent), store, shard_size=3)
    assert (report.added, report.quarantined, report.ignored[0].endswith("LICENSES.md")) == (
        4,
        0,
        True,
    )
    manifest = store.manifest().to_pylist()
    assert [r["image_id"] for r in manifest] == [1, 2, 3, 4]  # sorted by source URI
    assert [r["source"].rsplit("/", 1)[1] for r in manifest] == [p.name for p in demo_photos]
    assert [r["shard"] for r in manifest] == ["shard-000000"] * 3 + ["shard-000001"]
    assert set(store.manifest().schema.names) >= {
        "image_id",
        "source",
        "bytes",
        "sha256",
        "width",
        "height",
        "shard",
    }
    rows = [row for shard in store.shards() for row in store.iter_shard(shard)]
    for row, path, entry in zip(rows, demo_photos, manifest):
        assert row.data == path.read_bytes()  # the shard holds the original bytes
        assert hashlib.sha256(row.data).hexdigest() == entry["sha256"] and entry["bytes"] == len(
            row.data
        )
        assert (row.width, row.height) == (entry["width"], entry["height"])
    assert (manifest[0]["width"], manifest[0]["height"]) == (512, 512)


def test_ingest_takes_a_path_object_and_records_it_as_text(tmp_path, demo_photos):
    store = Store.create(tmp_path / "store")
    report = ingest(demo_photos[0].parent, store, shard_size=3)  # a pathlib.Path, not a str
    assert report.added == 4 and len(store.manifest()) == 4
    (record,) = (tmp_path / "store" / "runs" / "ingest").glob("*.json")
    written = json.loads(record.read_text())
    assert written["source"] == str(demo_photos[0].parent)
    # every run record names the versions it ran with (what made these files, for a bug report)
    assert written["versions"]["sa-engine"] and written["versions"]["torch"] != "not installed"


def test_reingest_changes_nothing_and_additions_never_renumber(tmp_path, demo_photos):
    src = tmp_path / "src"
    src.mkdir()
    for p in demo_photos[:3]:
        shutil.copy(p, src / p.name)
    store = Store.create(tmp_path / "store")
    ingest(str(src), store, shard_size=2)
    reader = Store(tmp_path / "store")  # a run's driver: the index columns only, cached
    assert reader.manifest_index().column_names == INDEX_COLUMNS
    assert reader.manifest_index().to_pylist() == store.manifest().select(INDEX_COLUMNS).to_pylist()
    before = _files(tmp_path / "store")
    again = ingest(f"file://{src}", store, shard_size=2)  # same files through a URI
    assert (again.added, again.unchanged, again.duplicates) == (0, 3, 0)
    assert _files(tmp_path / "store") == before
    # additions: one new photo, one new synthetic, one identical copy under another name
    shutil.copy(demo_photos[3], src / "zz_rocket.jpg")
    synthetic_photos(src / "more", 1)
    shutil.copy(demo_photos[0], src / "more" / "astronaut_copy.jpg")
    report = ingest(str(src), store, shard_size=2)
    assert (report.added, report.duplicates, report.unchanged) == (2, 1, 3)
    assert reader.manifest_index().num_rows == 5 and reader.shard_sizes()["shard-000002"] == 2
    rows = {r["image_id"]: (r["width"], r["height"]) for r in store.manifest().to_pylist()}
    assert reader.image_sizes([5, 1]) == {5: rows[5], 1: rows[1]}
    with pytest.raises(ValueError, match=r"images \[6\] are not in"):
        reader.image_sizes([2, 6])
    after = _files(tmp_path / "store")
    assert {k: v for k, v in after.items() if k in before} == before  # old shards/parts untouched
    manifest = store.manifest().to_pylist()
    assert [r["image_id"] for r in manifest] == [1, 2, 3, 4, 5]
    assert {r["shard"] for r in manifest if r["image_id"] > 3} == {
        "shard-000002"
    }  # new images, new shard
    dup = store.duplicates().to_pylist()
    assert dup[0]["source"].endswith("astronaut_copy.jpg") and dup[0]["image_id"] == 1
    assert ingest(str(src), store, shard_size=2).added == 0 and _files(tmp_path / "store") == after


@pytest.mark.parametrize("listing", ["folder", "list file", "list file, folder listed"])
def test_skip_known_reads_only_what_is_new_or_resized(tmp_path, demo_photos, listing, monkeypatch):
    """--skip-known: a file the store holds under the same URI and size is not read (so one
    rewritten in place at the same size is missed: the cost of not reading); a resized one is
    read, and a new one added, as without it. A list file's known files get their sizes a file
    at a time, or from one listing of a folder that holds many of them (never a file at a time
    then)."""
    import sharding.sources

    if listing == "list file, folder listed":
        monkeypatch.setattr(sharding.sources, "FOLDER_LISTING_MIN", 2)

        def one_at_a_time(uri):
            raise AssertionError(f"{uri}: asked a file at a time, not from its folder's listing")

        monkeypatch.setattr(sharding.sources, "source_size", one_at_a_time)
    src = tmp_path / "src"
    src.mkdir()
    for p in demo_photos[:3]:
        shutil.copy(p, src / p.name)
    source = str(src)
    if listing.startswith("list file"):
        (tmp_path / "list.txt").write_text("\n".join(f"src/{p.name}" for p in demo_photos[:4]))
        source = str(tmp_path / "list.txt")
    store = Store.create(tmp_path / "store")
    ingest(str(src), store, shard_size=2)
    same_size = bytearray((src / demo_photos[0].name).read_bytes())
    same_size[-3] ^= 0x01  # (inside the JPEG's last bytes: same size, other content)
    (src / demo_photos[0].name).write_bytes(bytes(same_size))
    (src / demo_photos[1].name).write_bytes(demo_photos[3].read_bytes())  # other size
    shutil.copy(demo_photos[3], src / demo_photos[3].name)  # new
    report = ingest(source, store, shard_size=2, skip_known=True)
    assert (report.listed, report.unchanged, report.added, report.duplicates) == (4, 2, 1, 1)
    # without it the same-size rewrite is read: new content, a new image
    report = ingest(source, store, shard_size=2)
    assert (report.added, report.unchanged) == (1, 3)


def test_dedupe_lookup_confirms_on_the_full_sha256():
    """The dedupe looks sha256s up by their last 8 bytes: rows sharing those (a collision,
    made here) are told apart on the full string, whatever the table's chunking."""
    import pyarrow as pa

    from sharding.manifest import _KnownImages, _sha_keys

    real = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(50)]
    tail = real[0][48:]
    twins = ["a" * 48 + tail, "b" * 48 + tail, real[0]]  # same last 16 digits
    shas = real[1:] + twins
    assert (_sha_keys(pa.chunked_array([shas[:20], shas[20:]])) == [int(s[48:], 16) for s in shas]).all()
    manifest = pa.table(
        {
            "image_id": list(range(1, len(shas) + 1)),
            "source": [f"s3://b/{i}.jpg" for i in range(len(shas))],
            "sha256": pa.chunked_array([shas[:30], shas[30:]]),
        }
    )
    none = pa.table({"source": pa.array([], pa.string()), "sha256": pa.array([], pa.string())})
    known = _KnownImages(manifest, none)
    for row, sha in enumerate(shas):
        assert known.kept(sha) == (row + 1, f"s3://b/{row}.jpg")
    assert known.kept("c" * 48 + tail) is None
    assert known.kept(hashlib.sha256(b"new").hexdigest()) is None


def test_two_stores_from_one_source_are_identical(tmp_path):
    """Whatever the number of reading threads: a copy, an unreadable file and a broken image
    among them land the same way."""
    photos = synthetic_photos(tmp_path / "src", 7)
    (tmp_path / "src" / "img_copy.jpg").write_bytes(photos[2].read_bytes())
    (tmp_path / "src" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "src" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    reports = [
        ingest(str(tmp_path / "src"), Store.create(tmp_path / name), shard_size=3, threads=threads)
        for name, threads in (("a", 1), ("b", 4))
    ]
    assert reports[0] == reports[1] and (reports[0].added, reports[0].duplicates) == (7, 1)
    assert reports[0].quarantined == 2
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a.keys() == files_b.keys()
    assert all(files_a[k] == files_b[k] for k in files_a if k.endswith(".parquet"))


def test_glob_list_file_and_memory_filesystem(tmp_path):
    synthetic_photos(tmp_path / "src" / "sub", 4)
    glob = list_source(str(tmp_path / "src" / "**" / "img_00[12].jpg"))
    assert [u.rsplit("/", 1)[1] for u in glob.uris] == ["img_001.jpg", "img_002.jpg"]
    # a path that exists is no glob, whatever its characters
    odd = tmp_path / "sets [2023]"
    odd.mkdir()
    (odd / "img[1].jpg").write_bytes((tmp_path / "src" / "sub" / "img_000.jpg").read_bytes())
    (odd / "img1.jpg").write_bytes((tmp_path / "src" / "sub" / "img_001.jpg").read_bytes())
    (odd / "cam.jfif").write_bytes((tmp_path / "src" / "sub" / "img_002.jpg").read_bytes())
    assert [u.rsplit("/", 1)[1] for u in list_source(str(odd)).uris] == ["cam.jfif", "img1.jpg", "img[1].jpg"]
    (uri,) = list_source(str(odd / "img[1].jpg")).uris
    assert uri.endswith("/sets [2023]/img[1].jpg")
    (tmp_path / "src" / "list.txt").write_text(  # (one named twice: listed once; CRLF too)
        "\ufeffsub/img_001.jpg\n# three files\nsub/img_003.jpg\n\n" + str(tmp_path / "src/sub/img_000.jpg") + "\r\n"
        "sub/img_003.jpg\n./sub/img_001.jpg\nsub/../sub/img_003.jpg",  # (one file written three ways)
        encoding="utf-8",
    )  # (a BOM first, as Notepad saves UTF-8: not part of the first path)
    assert [u.rsplit("/", 1)[1] for u in list_source(str(tmp_path / "src" / "list.txt")).uris] == [
        "img_000.jpg", "img_001.jpg", "img_003.jpg"
    ]  # fmt: skip
    store = Store.create(tmp_path / "store")
    report = ingest(str(tmp_path / "src" / "list.txt"), store)
    assert report.added == 3 and report.quarantined == 0
    assert [r.rsplit("/", 1)[1] for r in store.manifest().column("source").to_pylist()] == [
        "img_000.jpg",
        "img_001.jpg",
        "img_003.jpg",
    ]

    memory = fsspec.filesystem("memory")
    for path in sorted((tmp_path / "src" / "sub").glob("*.jpg")):
        memory.pipe(f"/bucket/photos/{path.name}", path.read_bytes())
    mem_store = Store.create(tmp_path / "mem")
    report = ingest("memory://bucket/photos", mem_store, shard_size=2)
    assert report.added == 4 and mem_store.shards() == ["shard-000000", "shard-000001"]
    assert mem_store.shard_sizes() == {"shard-000000": 2, "shard-000001": 2}
    assert mem_store.shard_images() == {"shard-000000": [1, 2], "shard-000001": [3, 4]}
    assert mem_store.image_ids("shard-000001") == [3, 4]  # (from the shard's own file)
    assert all(s.startswith("memory://") for s in mem_store.manifest().column("source").to_pylist())
    assert ingest("memory://bucket/photos", mem_store).added == 0
    memory.rm("/bucket", recursive=True)


def test_bad_sources_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="names no image files"):
        list_source(str(tmp_path / "empty"))
    (tmp_path / "latin1.txt").write_bytes("a.jpg\ncaf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text .*save it as UTF-8"):
        list_source(str(tmp_path / "latin1.txt"))
    store = Store.create(tmp_path / "store")
    with pytest.raises(ValueError, match="shard_size"):
        ingest(str(tmp_path), store, shard_size=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="non-empty folder"):
        Store.create(tmp_path / "full")


def _kill_mid_ingest(tmp_path, store, extra, started):
    """Runs `sa-engine ingest src --store STORE --shard-size 5 EXTRA...` and SIGKILLs it as soon as
    `started(store path)` holds (polled every 5 ms)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "engine.cli", "ingest", str(tmp_path / "src"), "--store",
               str(store), "--shard-size", "5", *extra]  # fmt: skip
    proc = subprocess.Popen(command, cwd=root)
    deadline = time.time() + 60
    try:
        while not started(store) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_sigkilled_ingest_commits_nothing_and_reruns_cleanly(tmp_path):
    synthetic_photos(tmp_path / "src", 60, size=(640, 480))
    ingest(str(tmp_path / "src"), Store.create(tmp_path / "clean"), shard_size=5)
    shards = tmp_path / "killed" / "shards"
    _kill_mid_ingest(tmp_path, tmp_path / "killed", [], lambda _: list(shards.glob("shard-*.parquet")))
    written = list(shards.glob("shard-*.parquet"))
    assert 1 <= len(written) < 12, "the kill must land mid-ingest"
    killed = Store(tmp_path / "killed")
    assert killed.manifest().num_rows == 0  # the manifest part is the commit: nothing half-visible
    # what a kill during a manifest part's write leaves (the kill above may leave a shard's)
    (tmp_path / "killed" / "manifest" / ".part-000001.parquet.x1y2z3.tmp").write_bytes(b"PAR1")
    report = ingest(str(tmp_path / "src"), killed, shard_size=5)
    assert report.added == 60
    clean_files, killed_files = _files(tmp_path / "clean"), _files(tmp_path / "killed")
    del clean_files["store.json"], killed_files["store.json"]  # differ only in creation time
    assert killed_files == clean_files


@pytest.mark.slow
def test_an_ingest_stopped_after_a_commit_goes_on_from_it(tmp_path):
    """With commits every 2 shards (10 images), a SIGKILL after the first commit keeps what was
    committed; the re-run reads those files as unchanged and ends with the store an ingest that
    was never stopped makes, file for file."""
    synthetic_photos(tmp_path / "src", 60, size=(640, 480))
    (tmp_path / "src" / "broken.jpg").write_bytes(b"not a jpeg")  # quarantined in the first part
    clean = Store.create(tmp_path / "clean")
    clean = ingest(str(tmp_path / "src"), clean, shard_size=5, commit_shards=2)
    assert clean.added == 60 and len(list((tmp_path / "clean" / "manifest").glob("*.parquet"))) == 6
    runs = tmp_path / "killed" / "runs" / "ingest"  # (written just after each commit)
    _kill_mid_ingest(
        tmp_path, tmp_path / "killed", ["--commit-shards", "2"], lambda _: list(runs.glob("*.json"))
    )
    killed = Store(tmp_path / "killed")
    kept = killed.manifest().num_rows
    assert kept in (10, 20, 30, 40, 50), f"the kill must land after a commit, mid-ingest ({kept})"
    assert killed.ingest_quarantine().num_rows == 1
    (record,) = [json.loads(p.read_text()) for p in runs.glob("*.json")]
    assert record["finished_at"] is None and record["added"] == kept  # rewritten at each commit
    assert record["parts"] == list(range(1, kept // 10 + 1)) and len(record["shards_added"]) == kept // 5
    (line,) = [l for l in status_lines(killed) if "the last ingest" in l]
    assert f"stopped after committing {kept} images in {kept // 5} shards" in line
    assert line.endswith(f"--store {killed.root} --shard-size 5 --commit-shards 2` again to go on")
    report = ingest(str(tmp_path / "src"), killed, shard_size=5, commit_shards=2)
    assert (report.added, report.unchanged, report.quarantined) == (60 - kept, kept + 1, 0)
    assert not any("the last ingest" in l or "ingest running" in l for l in status_lines(killed))
    assert report.listed == report.added + report.unchanged + report.duplicates + report.quarantined
    clean_files, killed_files = _files(tmp_path / "clean"), _files(tmp_path / "killed")
    del clean_files["store.json"], killed_files["store.json"]  # differ only in creation time
    assert killed_files == clean_files
    with pytest.raises(ValueError, match="commit_shards 0 is invalid"):
        ingest(str(tmp_path / "src"), killed, commit_shards=0)


def test_a_new_image_whose_sha256_tail_matches_a_stored_one_is_still_validated(
    tmp_path, demo_photos, monkeypatch
):
    """The per-file check skips the decode of content whose sha256's last 8 bytes a stored image
    shares; when the full sha256 then differs (a chance match, forced here), the ingest decodes it
    itself: the new image gets its id and size like any other."""
    import numpy as np

    import sharding.manifest as manifest

    first, second = demo_photos[:2]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(first, src / first.name)
    store = Store.create(tmp_path / "store")
    ingest(str(src), store)
    shutil.copy(second, src / second.name)
    tail = np.uint64(int(hashlib.sha256(second.read_bytes()).hexdigest()[48:], 16))
    check = manifest.FileCheck

    def colliding(max_pixels, min_side, keys, *rest, **kw):
        return check(max_pixels, min_side, np.sort(np.append(keys, tail)), *rest, **kw)

    monkeypatch.setattr(manifest, "FileCheck", colliding)
    assert not colliding(1 << 30, 1, np.zeros(0, np.uint64))(str(src / second.name)).decoded
    report = ingest(str(src), store)
    assert (report.added, report.unchanged) == (1, 1)
    reference = Store.create(tmp_path / "reference")
    ingest(str(second), reference)
    columns = ["sha256", "width", "height", "original_mode", "exif_rotated", "bytes"]
    assert store.manifest().select(columns).slice(1).equals(reference.manifest().select(columns))


def test_new_images_dedupe_through_merges_and_tail_twins():
    """An ingest's own new images are found by sha256 whether their keys are recent or merged,
    and contents sharing their last 8 bytes (made here) are told apart on the full sha256."""
    from sharding.manifest import _NewImages

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    tail = shas[0][48:]
    twins = ["a" * 48 + tail, "b" * 48 + tail]
    new = _NewImages(merge_every=4)
    for i, sha in enumerate(shas[:20] + twins + shas[20:]):
        new.add(sha, 101 + i, f"s3://b/{i}.jpg")
        for j, seen in enumerate((shas[:20] + twins + shas[20:])[: i + 1]):
            assert new.get(seen) == (101 + j, f"s3://b/{j}.jpg")
    assert new.get("c" * 48 + tail) is None and new.get(hashlib.sha256(b"x").hexdigest()) is None
    with pytest.raises(ValueError, match="consecutive"):
        new.add(hashlib.sha256(b"y").hexdigest(), 500, "s3://b/y.jpg")


def test_one_ingest_at_a_time_and_a_killed_one_holds_nothing(tmp_path, demo_photos):
    """Two ingests at once would number the same images and shards: the second is refused,
    naming the first; the lock goes with its process, so a SIGKILLed holder leaves none."""
    import subprocess
    import sys
    from pathlib import Path

    store = Store.create(tmp_path / "store")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sharding.store import Store\n"
         "with Store(sys.argv[1]).ingest_lock():\n    print('held', flush=True); time.sleep(60)",
         str(store.root)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"ingest running (pid {holder.pid} on " in status_lines(store)[1]
        with pytest.raises(ValueError, match=rf"another ingest is adding to .*\(pid {holder.pid} on "):
            ingest(str(demo_photos[0].parent), store)
    finally:
        holder.kill()
        holder.wait()
    assert store.manifest().num_rows == 0
    assert ingest(str(demo_photos[0].parent), store).added == len(demo_photos)


def test_folders_are_listed_into_linked_folders_and_without_hidden_ones(tmp_path, demo_photos):
    """A symbolic link to a folder of photos is part of the folder (ingest called it a non-image
    file; amg and blur left it out); hidden files and folders are left out by ingest as by amg
    and blur (ingest took files inside hidden folders). A link back up the tree is walked once."""
    from engine.cli.common import files_under

    src, other = tmp_path / "src", tmp_path / "other"
    for folder in (src / "sub", src / ".cache", other):
        folder.mkdir(parents=True)
    for path in (src / "sub" / "a.jpg", src / ".cache" / "b.jpg", src / ".c.jpg", other / "d.jpg"):
        shutil.copy(demo_photos[0], path)
    (src / "linked").symlink_to(other)
    (other / "loop").symlink_to(src)
    listing = list_source(str(src))
    assert [u.split("/src/", 1)[1] for u in listing.uris] == ["linked/d.jpg", "sub/a.jpg"]
    spaced = tmp_path / "my photos"  # a file:// URI as a file manager copies it: %20 for a space
    src.rename(spaced)
    assert len(list_source("file://" + str(spaced).replace(" ", "%20")).uris) == 2
    spaced.rename(src)
    assert listing.ignored == []
    assert [p.relative_to(src).as_posix() for p in files_under(src)] == ["linked/d.jpg", "sub/a.jpg"]
