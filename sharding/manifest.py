"""Ingest: list a SOURCE, validate and deduplicate its images, cut the new ones into shards.

Image ids (SA-1B style `sa_<id>`): positive integers handed out in order. An ingest takes the
files it has never seen (by content sha256), sorts them by source URI and numbers them from
(largest id in the store) + 1. So re-ingesting a source changes nothing, and adding files never
renumbers old images: ids are stable for the life of the store. Identical files (same sha256) get
one id; every further copy is recorded in `duplicates/`. New images always go to new shards
(`shard-NNNNNN`, numbered on from the last one), `shard_size` images each, in id order.
An ingest commits every `commit_shards` new shards (a manifest part renamed into place), so a
stopped one is re-run from its last commit and ends as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.atomic import atomic_path, remove_temporaries
from engine.checks import invalid
from engine.image_io import ImageInfo, ImageLoadError, load_image_with_info
from sharding import tables
from sharding.sources import SourceListing, current_sizes, list_source, read_source
from sharding.store import Store, utc_now

DEFAULT_SHARD_SIZE = 1000
# New shards an ingest commits at a time: what a stopped ingest can lose (64k images at the
# default shard size); a re-run goes on from the last commit.
DEFAULT_COMMIT_SHARDS = 64
_ROW_GROUP = 16  # images per Parquet row group: readers stream a shard 16 images at a time
_MANIFEST_GROUP = 65536  # manifest rows an ingest holds before writing them out
# the store's folders only an ingest writes (under the store's ingest lock)
INGEST_FOLDERS = ("shards", "manifest", "duplicates", "quarantine", "runs/ingest")


@dataclass
class IngestConfig:
    """The `ingest:` config block: see `ingest` for the first four, `stages.ingest.RayIngest`
    for chunk and cpus; ray: run the per-file work and the shard writing on Ray; progress: the
    command's progress line (`stages.progress.IngestProgress`) on stderr."""

    shard_size: int = DEFAULT_SHARD_SIZE
    skip_known: bool = False
    threads: int | None = None
    commit_shards: int | None = DEFAULT_COMMIT_SHARDS
    ray: bool = False
    chunk: int = 64
    cpus: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise invalid(
                "ingest.shard_size", self.shard_size,
                "a positive number of images per shard",
            )  # fmt: skip
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise invalid(
                "ingest.threads", self.threads,
                "a positive number (1: no reading threads) or null",
            )  # fmt: skip
        if self.commit_shards is not None and (
            not isinstance(self.commit_shards, int) or self.commit_shards < 1
        ):
            raise invalid(
                "ingest.commit_shards", self.commit_shards,
                "a positive number of new shards per commit, or null (one commit at the end)",
            )  # fmt: skip
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise invalid("ingest.chunk", self.chunk, "a positive number of files")
        if not isinstance(self.cpus, (int, float)) or not self.cpus > 0:
            raise invalid("ingest.cpus", self.cpus, "a value > 0")


@dataclass
class IngestReport:
    """What one ingest did; every listed file lands in exactly one of the counts."""

    listed: int = 0
    added: int = 0
    unchanged: int = 0
    duplicates: int = 0
    quarantined: int = 0
    ignored: list[str] = field(default_factory=list)
    shards_added: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"listed {self.listed} files: {self.added} added in {len(self.shards_added)} new shards, "
            f"{self.unchanged} already in the store, {self.duplicates} duplicates recorded, "
            f"{self.quarantined} quarantined"
        )
        if self.reasons:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) + ")"
        if self.ignored:
            text += f"; ignored {len(self.ignored)} non-image files by extension"
        return text


class _TableWriter:
    """Streams rows into a temporary Parquet file, `group` rows a row group, and renames it onto
    `path` when closed (a shard, or an ingest's manifest part: its commit)."""

    def __init__(self, path: Path, schema: pa.Schema, group: int) -> None:
        self._stack = contextlib.ExitStack()
        self._tmp = tmp = self._stack.enter_context(atomic_path(path))
        self._schema, self._group = schema, group
        self._writer = pq.ParquetWriter(tmp, schema)
        self._rows: list[dict[str, Any]] = []
        self._sealed = False
        self.closed = False  # renamed into place
        self.count = 0

    @property
    def tmp(self) -> Path:
        """Where the rows are written until `close` renames the file into place."""
        return self._tmp

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= self._group:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def seal(self) -> None:
        """Finish the file at `tmp`, readable there, without renaming it yet."""
        if not self._sealed:
            self._flush()
            self._writer.close()
            self._sealed = True

    def close(self) -> None:
        self.seal()
        self._stack.close()
        self.closed = True

    def abort(self) -> None:
        if not self._sealed:
            self._writer.close()
        self._stack.pop_all()  # drop the rename: the file stays unwritten
        self._tmp.unlink(missing_ok=True)


@dataclass
class FileRead:
    """One listed file after the per-file work (`FileCheck`): its sha256 ("" when unreadable) and
    size, and, unless its content is already stored, the decode's verdict: `info`, or a
    quarantine `reason` and `detail`. `data`: the bytes, when the check keeps them (the local
    ingest writes shards from them; on Ray only this summary comes back)."""

    sha: str = ""
    size: int = 0
    data: bytes | None = None
    info: ImageInfo | None = None
    reason: str = ""
    detail: str = ""

    @property
    def decoded(self) -> bool:
        return self.info is not None or bool(self.reason)


@dataclass
class FileCheck:
    """An ingest's per-file work (read, hash, and decode-validate unless the content is already
    stored), picklable for Ray's workers: what it knows of the store is the stored sha256s' last
    8 bytes (`_sha_keys`, sorted) and the (source, sha256) pairs quarantined before. A tail that
    matches only by chance skips a decode the ingest then does itself (`_decode`)."""

    max_pixels: int
    min_side: int
    stored_keys: np.ndarray
    quarantined: frozenset = frozenset()
    keep_bytes: bool = True

    def __call__(self, uri: str) -> FileRead:
        try:
            data = read_source(uri)
        except (OSError, ValueError) as exc:
            return FileRead(reason="unreadable", detail=f"{type(exc).__name__}: {exc}")
        sha = hashlib.sha256(data).hexdigest()
        read = FileRead(sha, len(data), data if self.keep_bytes else None)
        key = np.uint64(int(read.sha[48:], 16))
        at = int(self.stored_keys.searchsorted(key))
        stored = at < len(self.stored_keys) and self.stored_keys[at] == key
        if not stored and (uri, read.sha) not in self.quarantined:
            _decode(uri, data, read, self.max_pixels, self.min_side)
        return read


def _decode(uri: str, data: bytes, read: FileRead, max_pixels: int, min_side: int) -> None:
    """Decode-validate `data` into `read.info`, or its quarantine reason and detail."""
    try:
        rgb, read.info = load_image_with_info(
            data, name=uri, max_pixels=max_pixels, min_side=min_side
        )
        del rgb
    except ImageLoadError as err:
        read.reason, read.detail = err.reason, f"{err.detail} ({err.fix})"


def _read_in_order(uris: list[str], check, threads: int) -> Iterator[FileRead]:
    """`check(uri)` for every URI on `threads` threads, yielded in the URIs' order, with at most
    a few files per thread in flight (their bytes are held until consumed). Reading, hashing
    and JPEG/PNG decoding release the GIL, so the threads run on separate cores."""
    if threads <= 1:
        yield from map(check, uris)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ingest") as pool:
        pending: deque = deque()
        todo = iter(uris)
        for uri in itertools.islice(todo, 4 * threads):
            pending.append(pool.submit(check, uri))
        while pending:
            done = pending.popleft().result()
            for uri in itertools.islice(todo, 1):
                pending.append(pool.submit(check, uri))
            yield done


class IngestCluster(Protocol):
    """Where an ingest's per-file work and its shard writing run instead of this process's
    threads (`stages.ingest.RayIngest`: a Ray cluster, each file read where a task runs)."""

    def scan(self, uris: list[str], check: FileCheck) -> Iterator[FileRead]:
        """`check(uri)` of every URI, yielded in the URIs' order."""
        ...

    def write_shards(self, store: Store, plan: Path, shards: list[str]) -> None:
        """`write_planned_shard(store, plan, shard)` for every shard."""
        ...


def ingest(
    source: str | os.PathLike[str],
    store: Store,
    shard_size: int = DEFAULT_SHARD_SIZE,
    skip_known: bool = False,
    threads: int | None = None,
    commit_shards: int | None = DEFAULT_COMMIT_SHARDS,
    cluster: IngestCluster | None = None,
    on_file: Callable[[int, int, IngestReport], None] | None = None,
) -> IngestReport:
    """Add SOURCE's new images to `store` as new shards (see the module docstring for the id rule).

    Arguments:
      source (str | PathLike): folder, glob, list file or single file, local or any fsspec URI.
      store (Store): the store (from `Store.create`), validated with its min_side/max_pixels.
      shard_size (int): images per new shard.
      skip_known (bool): count a listed file the manifest holds under the same URI with the same
        byte size as unchanged without reading it (sizes from a folder's or a glob's listing,
        else asked per file): a re-ingest of a source that only grew reads only the new files.
        A file rewritten in place at the same size is then missed. False: every file is read
        and hashed; content decides.
      threads (int | None): files read, hashed and decoded at once (None: one per CPU, at most
        8); ids, shards and tables come out the same for any number.
      commit_shards (int | None): commit every this many new shards (None: once, at the end):
        the manifest part of those shards' images, with the duplicates and quarantined inputs
        met since the last commit. A stopped ingest keeps what it committed; run again, it
        counts those files unchanged (unread with `skip_known`) and goes on with the same ids,
        shards and tables as an ingest that was never stopped.
      cluster (IngestCluster | None): run the per-file work and the shard writing there (files
        are read twice: once to hash and validate, once to write their shard, checked against
        the first hash); this process only lists, numbers and commits. Ids, shards and tables
        come out the same as without.
      on_file (Callable | None): called before each file to read and once after the last, with
        (files read, files to read, the report's counts so far): a progress display.
    Returns:
      (IngestReport): counts; bad inputs are in `store.ingest_quarantine()` with their reasons.
    Raises:
      ValueError: bad arguments or source, or another ingest adding to the store right now.
    """
    if shard_size < 1:
        raise ValueError(
            f"shard_size {shard_size} is invalid: use a positive number of images per shard"
        )
    if commit_shards is not None and commit_shards < 1:
        raise ValueError(
            f"commit_shards {commit_shards} is invalid: use a positive number of shards or None"
        )
    with store.ingest_lock():
        for folder in INGEST_FOLDERS:  # what a killed ingest was writing: only ingests write here
            remove_temporaries(store.root / folder)
        return _ingest(
            os.fspath(source), store, shard_size, skip_known, threads, commit_shards, cluster, on_file
        )


def _ingest(
    source: str,
    store: Store,
    shard_size: int,
    skip_known: bool,
    threads: int | None,
    commit_shards: int | None,
    cluster: IngestCluster | None,
    on_file: Callable[[int, int, IngestReport], None] | None,
) -> IngestReport:
    """`ingest`, under the store's ingest lock."""
    listing = list_source(source, with_sizes=skip_known)
    report = IngestReport(listed=len(listing.uris) + len(listing.unreadable), ignored=listing.ignored)
    manifest = store.manifest_columns(["image_id", "source", "sha256"] + ["bytes"] * skip_known)
    unread = _same_uri_and_size(listing, manifest) if skip_known else None
    known = _KnownImages(manifest, store.duplicates())
    old_q = store.ingest_quarantine()
    quarantined_before = frozenset(
        zip(old_q.column("source").to_pylist(), old_q.column("sha256").to_pylist())
    )
    check = FileCheck(
        store.max_pixels, store.min_side, known.keys, quarantined_before, keep_bytes=cluster is None
    )
    next_id = (pc.max(manifest.column("image_id")).as_py() or 0) + 1
    shard_names = store.shards()
    next_shard = int(shard_names[-1].split("-")[-1]) + 1 if shard_names else 0
    part = _Part.open(store, len(list((store.root / "manifest").glob("part-*.parquet"))) + 1)
    committed: list[int] = []  # the parts committed
    totals = IngestReport()  # what they added, duplicates and quarantined, their shards
    writer: _TableWriter | None = None  # the shard being written here (no cluster)
    in_shard = 0

    to_read = [u for i, u in enumerate(listing.uris) if unread is None or not unread[i]]
    report.unchanged += len(listing.uris) - len(to_read)
    if cluster is not None:
        reads = cluster.scan(to_read, check)
    else:
        reads = _read_in_order(to_read, check, threads or min(8, os.cpu_count() or 1))

    def counted(done: int) -> None:
        report.added = totals.added + part.manifest.count
        report.duplicates = totals.duplicates + len(part.duplicates)
        report.quarantined = totals.quarantined + len(part.quarantined)
        if on_file is not None:
            on_file(done, len(to_read), report)

    started = utc_now()
    record_path = store.run_record_path("ingest", started)

    def write_record(finished: bool) -> None:
        """The run record, rewritten at each commit (what a stopped ingest committed) and last."""
        counts = {
            "added": totals.added,
            "duplicates": totals.duplicates,
            "quarantined": totals.quarantined,
            "shards_added": totals.shards_added,
        }
        store.write_run_record(
            "ingest",
            {
                "source": source,
                "started_at": started,
                "finished_at": utc_now() if finished else None,  # None: stopped, or still running
                "parts": committed,
                "shard_size": shard_size,
                "commit_shards": commit_shards,
                "on": "local threads" if cluster is None else "cluster",
                **report.__dict__,
                **({} if finished else counts),
            },
            record_path,
        )

    def commit() -> None:
        nonlocal part
        part.commit(store, cluster)
        committed.append(part.number)
        totals.added += part.manifest.count
        totals.duplicates += len(part.duplicates)
        totals.quarantined += len(part.quarantined)
        totals.shards_added += part.shards
        for q in part.quarantined:
            report.reasons[q["reason"]] = report.reasons.get(q["reason"], 0) + 1
        write_record(finished=False)
        part = _Part.open(store, part.number + 1)

    for uri, error in listing.unreadable:  # a folder that cannot be listed: its files are unknown
        if (uri, "") in quarantined_before:
            report.unchanged += 1
            continue
        part.quarantined.append(_quarantine(
            uri, "", "unreadable",
            f"folder cannot be listed ({error}): its files were not read; make it readable and ingest again",
        ))  # fmt: skip
    try:
        for done, (uri, read) in enumerate(zip(to_read, reads)):
            counted(done)
            if not read.sha:  # unreadable
                if (uri, "") in quarantined_before:
                    report.unchanged += 1
                else:
                    part.quarantined.append(_quarantine(uri, "", read.reason, read.detail))
                continue
            sha = read.sha
            kept = known.kept(sha)
            if kept is not None:
                if known.seen(uri, sha, kept):
                    report.unchanged += 1
                else:
                    part.duplicates.append(
                        {"source": uri, "sha256": sha, "image_id": kept[0], "kept_source": kept[1]}
                    )
                    known.duplicates.add((uri, sha))
                continue
            if (uri, sha) in quarantined_before:
                report.unchanged += 1
                continue
            if not read.decoded:  # its sha256's tail matched a stored one's by chance
                _decode(uri, read.data or read_source(uri), read, store.max_pixels, store.min_side)
            if read.reason:
                part.quarantined.append(_quarantine(uri, sha, read.reason, read.detail))
                continue
            info = read.info
            if in_shard == 0:
                part.shards.append(f"shard-{next_shard:06d}")
                report.shards_added.append(part.shards[-1])
                if cluster is None:
                    writer = _TableWriter(store.shard_path(part.shards[-1]), tables.SHARD, _ROW_GROUP)
            known.added.add(sha, next_id, uri)
            row = {"image_id": next_id, "source": uri, "sha256": sha, "width": info.width,
                   "height": info.height}  # fmt: skip
            if writer is not None:
                writer.add({**row, "data": read.data})
            part.manifest.add(
                {
                    **row,
                    "bytes": read.size,
                    "shard": part.shards[-1],
                    "original_mode": info.original_mode,
                    "exif_rotated": info.exif_rotated,
                }
            )
            next_id += 1
            in_shard += 1
            if in_shard >= shard_size:
                if writer is not None:
                    writer.close()
                    writer = None
                in_shard, next_shard = 0, next_shard + 1
                if commit_shards is not None and len(part.shards) >= commit_shards:
                    commit()
        if writer is not None:
            writer.close()
            writer = None
        counted(len(to_read))
        if part.manifest.count or part.duplicates or part.quarantined:
            commit()
    finally:
        if writer is not None:
            writer.abort()
        part.abort()  # the uncommitted rest (nothing, after the last commit)
    if committed:
        write_record(finished=True)
    return report


@dataclass
class _Part:
    """One commit of an ingest: its manifest rows (streamed to a temporary file as they come: a
    first ingest of SA-1B's 11M would otherwise hold them all), the duplicates and quarantined
    inputs it met, and its new shards. Renaming the manifest part into place commits it
    (`Store` reads the duplicates and quarantine parts of committed manifest parts only)."""

    number: int
    manifest: _TableWriter
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, store: Store, number: int) -> "_Part":
        path = store.root / "manifest" / f"part-{number:06d}.parquet"
        return cls(number, _TableWriter(path, tables.MANIFEST, _MANIFEST_GROUP))

    def commit(self, store: Store, cluster: IngestCluster | None) -> None:
        """Write the part's shards (on the cluster; here they are written as they fill), its
        duplicates and quarantine tables, then its manifest part: the commit."""
        if cluster is not None and self.shards:
            self.manifest.seal()  # the shards' plan: each task reads its shard's rows
            cluster.write_shards(store, self.manifest.tmp, self.shards)
        name = f"{self.number:06d}.parquet"
        if self.duplicates:
            _write_table(store.root / "duplicates" / f"part-{name}", self.duplicates, tables.DUPLICATES)
        if self.quarantined:
            path = store.root / "quarantine" / f"ingest-{name}"
            _write_table(path, self.quarantined, tables.QUARANTINE)
        self.manifest.close()

    def abort(self) -> None:
        """Drop the manifest part if it was not committed (its shard files, if any were written,
        are not in the manifest: the next ingest writes those shards anew)."""
        if not self.manifest.closed:
            self.manifest.abort()


def write_planned_shard(store: Store, plan: Path, shard: str) -> int:
    """Write `shard` from its rows of an ingest's sealed manifest part `plan`, re-reading each
    source (a cluster ingest's second pass, run where a task runs); returns its image count.

    Raises ValueError naming a source that is gone or changed since it was hashed: the ingest
    then stops without committing the part being written, and a re-run hashes it anew."""
    columns = ["image_id", "source", "sha256", "width", "height"]
    rows = pq.read_table(plan, columns=columns, filters=[("shard", "=", shard)]).to_pylist()
    writer = _TableWriter(store.shard_path(shard), tables.SHARD, _ROW_GROUP)
    try:
        for row in rows:
            uri = row["source"]
            try:
                data = read_source(uri)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"{uri} can no longer be read ({type(exc).__name__}: {exc}) after this ingest "
                    "hashed it: nothing since the ingest's last commit was committed; re-run the "
                    "ingest to go on from there"
                ) from exc
            if hashlib.sha256(data).hexdigest() != row["sha256"]:
                raise ValueError(
                    f"{uri} changed while it was ingested (its sha256 differs from the one hashed "
                    "first): nothing since the ingest's last commit was committed; re-run the "
                    "ingest once the source is still"
                )
            writer.add({**row, "data": data})
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return len(rows)


def _same_uri_and_size(listing: SourceListing, manifest: pa.Table) -> np.ndarray:
    """Which listed URIs (a bool per `listing.uris`) the manifest holds with the size they have
    now: matched in Arrow and numpy, no Python object per stored image; sizes the listing lacks
    (a list file's) are asked of the filesystem for the URIs the manifest holds only, a folder
    listing at a time where a folder holds many (`sources.current_sizes`)."""
    unread = np.zeros(len(listing.uris), bool)
    if not manifest.num_rows or not listing.uris:
        return unread
    uris = pa.array(listing.uris, pa.string())
    rows = pc.index_in(uris, value_set=manifest.column("source").combine_chunks())
    hit = rows.is_valid()
    recorded = manifest.column("bytes").take(rows.filter(hit)).to_numpy()
    where = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
    if listing.sizes is not None:
        now = np.asarray(listing.sizes, np.int64)[where]
    else:
        now = current_sizes(listing.uris, where)
    unread[where[now == recorded]] = True
    return unread


class _KnownImages:
    """The images a store holds, by sha256, for an ingest's dedupe.

    The manifest's sha256s are looked up through their last 8 bytes, a sorted uint64 array and
    the rows in that order (16 bytes an image); a hit is confirmed on the full sha256 in the
    table, and the id and source are read from it only then. At SA-1B's 11M images that is
    ~0.18 GiB, against ~2 GiB for a dict of 11M strings."""

    def __init__(self, manifest: pa.Table, duplicates: pa.Table) -> None:
        self.ids = manifest.column("image_id")
        self.sources = manifest.column("source")
        self.shas = manifest.column("sha256")
        keys = _sha_keys(self.shas)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]
        self.added = _NewImages()  # this ingest's new images
        # (source, sha256) of every duplicate recorded, before and by this ingest
        self.duplicates = set(
            zip(duplicates.column("source").to_pylist(), duplicates.column("sha256").to_pylist())
        )

    def kept(self, sha: str) -> tuple[int, str] | None:
        """(image_id, source) of the stored or added image with this content, or None."""
        new = self.added.get(sha)
        if new is not None:
            return new
        row = self._row(sha)
        return None if row is None else (self.ids[row].as_py(), self.sources[row].as_py())

    def _row(self, sha: str) -> int | None:
        key = np.uint64(int(sha[48:], 16))
        first = int(self.keys.searchsorted(key, side="left"))
        last = int(self.keys.searchsorted(key, side="right"))
        for row in self.order[first:last].tolist():
            if self.shas[row].as_py() == sha:
                return row
        return None

    def seen(self, uri: str, sha: str, kept: tuple[int, str]) -> bool:
        """Whether this source with this content was met before (kept, or recorded a duplicate)."""
        return uri == kept[1] or (uri, sha) in self.duplicates


class _NewImages:
    """An ingest's new images by sha256, for the dedupe within it: ~60 bytes an image (its
    sha256's 32 bytes, its last 8 as a sorted uint64 key with the image's position, a reference to
    its source string), against ~250 for a dict of sha256 strings (2.7 GiB at SA-1B's 11M).

    Recent keys sit in a dict and are merged into the sorted arrays every `merge_every` images; a
    key met twice (two contents sharing their last 8 bytes) sends the later image to a small
    dict by full sha256. Ids are consecutive in the order images are added."""

    def __init__(self, merge_every: int = 1 << 18) -> None:
        self.merge_every = merge_every
        self._first_id: int | None = None
        self._sources: list[str] = []
        self._digests = bytearray()  # 32 bytes an image, in the order added
        self._recent: dict[int, int] = {}  # key -> position, not yet merged
        self._keys = np.zeros(0, np.uint64)  # merged keys, sorted
        self._rows = np.zeros(0, np.int64)  # their positions
        self._twins: dict[str, int] = {}  # sha256 -> position, for keys met before

    def add(self, sha: str, image_id: int, source: str) -> None:
        row = len(self._sources)
        if self._first_id is None:
            self._first_id = image_id
        if image_id != self._first_id + row:
            raise ValueError(
                f"new image ids must be consecutive: {image_id} after {self._first_id + row - 1}"
            )
        self._sources.append(source)
        self._digests += bytes.fromhex(sha)
        key = int(sha[48:], 16)
        if key in self._recent or self._merged_row(key) is not None:
            self._twins[sha] = row
            return
        self._recent[key] = row
        if len(self._recent) >= self.merge_every:
            keys = np.fromiter(self._recent, np.uint64, len(self._recent))
            rows = np.fromiter(self._recent.values(), np.int64, len(self._recent))
            keys, rows = np.concatenate([self._keys, keys]), np.concatenate([self._rows, rows])
            order = np.argsort(keys, kind="stable")
            self._keys, self._rows, self._recent = keys[order], rows[order], {}

    def get(self, sha: str) -> tuple[int, str] | None:
        """(image_id, source) of the new image with this content, or None."""
        key = int(sha[48:], 16)
        row = self._recent.get(key)
        if row is None:
            row = self._merged_row(key)
        if row is None or self._digests[32 * row : 32 * row + 32] != bytes.fromhex(sha):
            row = self._twins.get(sha)
        return None if row is None else (self._first_id + row, self._sources[row])

    def _merged_row(self, key: int) -> int | None:
        keys = self._keys
        if not len(keys):
            return None
        wanted = np.uint64(key)
        at = keys.searchsorted(wanted)  # (the method: numpy's function wrapper doubled the cost)
        return int(self._rows[at]) if at < len(keys) and keys[at] == wanted else None


_HEX_VALUE = np.zeros(256, np.uint8)  # ASCII hex digit -> its value (anything else: 0)
_HEX_VALUE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_VALUE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _sha_keys(shas: pa.ChunkedArray) -> np.ndarray:
    """The last 16 of the 64 hex digits of each sha256 as a uint64, column-wise (no Python string
    per row). A malformed value gets some number: lookups confirm hits on the full string."""
    out = []
    for chunk in shas.chunks:
        tail = pc.utf8_rpad(pc.utf8_slice_codeunits(chunk.fill_null(""), 48, 64), 16, "0")
        fixed = tail.cast(pa.binary(16))
        raw = np.frombuffer(fixed.buffers()[1], np.uint8)
        digits = _HEX_VALUE[raw[fixed.offset * 16 : (fixed.offset + len(fixed)) * 16]]
        digits = digits.reshape(-1, 16)
        packed = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])
        out.append(packed.view(">u8").ravel().astype(np.uint64))
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def _quarantine(uri: str, sha: str, reason: str, detail: str) -> dict[str, Any]:
    return {
        "stage": "ingest",
        "round": None,
        "shard": None,
        "image_id": None,
        "source": uri,
        "sha256": sha,
        "reason": reason,
        "detail": detail,
    }


def _write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
