"""The shard store: one folder that every stage reads from and writes to.

Layout (all tables are Parquet; every file is written atomically: temporary name, then rename):

    STORE/store.json                                  format, version, ingest limits
    STORE/manifest/part-NNNNNN.parquet                one part per ingest commit:
                                                      image_id, source, bytes, sha256, width, height,
                                                      shard, original_mode, exif_rotated
    STORE/shards/shard-NNNNNN.parquet                 the ORIGINAL image bytes (+ id, source, sha256,
                                                      width, height): later stages never touch SOURCE
    STORE/duplicates/part-NNNNNN.parquet              identical files seen again (source, sha256,
                                                      image_id, kept_source)
    STORE/quarantine/ingest-NNNNNN.parquet            inputs refused at ingest, with reason and detail
    STORE/stages/<stage>/round-<k>/<shard>.annotations.parquet   one row per mask (see tables.py),
                                                      with its annotation effort for gears 1 and 2
    STORE/stages/<stage>/round-<k>/<shard>.images.parquet        output images (e.g. blurred JPEGs)
    STORE/stages/<stage>/round-<k>/<shard>.done.json             completion record: counts, the
                                                      images done, the quarantined ones with reasons,
                                                      and the sha256 of every output file
    STORE/embeddings/<encoder-fingerprint>/<shard>.parquet      SAM image embeddings of a shard's
                                                      images (image_id, .npz bytes of
                                                      engine.predictor.ImageEmbedding), written before
                                                      annotation so that a click is answered by the
                                                      decoder alone; keyed by the image encoder's
                                                      fingerprint, so gears 1 and 2 and the web tool
                                                      share them and a retrained encoder never reads
                                                      stale ones; a cache: deleting it costs re-encoding
    STORE/runs/<stage>/<utc-time>-<pid>[-round-<k>].json   one record per run (ingest or stage)
    STORE/leases/<stage>/round-<k>/<shard>.lock       a shard held by an annotation session (an OS
                                                      file lock, gone with its process); batch.lock:
                                                      a batch run of that gear round

A shard output counts as done only when its `.done.json` exists AND every file it lists is there
with its recorded size; anything else (output without record, a missing or truncated file) is
redone. The recorded sha256s are checked where data leaves the store (exports) and by `status`: a
file that fails it (changed after its commit) sets its record aside (`.done.json.corrupt`), so the
next run redoes the shard.
A manifest part is renamed into place after its shards and tables (an ingest commits one every
`commit_shards` new shards), so an interrupted ingest leaves no half-visible batch; one ingest at a
time adds to a store (`Store.ingest_lock`).
The store is a local or shared POSIX folder (rename must be atomic); sources may be any fsspec URI.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.atomic import atomic_path, atomic_write_json
from engine.damaged import DamagedFile
from engine.image_io import DEFAULT_MAX_PIXELS, SAM_MIN_SIDE
from engine.provenance import package_versions, sha256_file
from engine.records import MaskRecord
from sharding import locks, tables

# the manifest columns `Store.manifest_index` keeps
INDEX_COLUMNS = ["image_id", "shard", "bytes", "width", "height"]
STORE_FORMAT = "sa-engine-store"
STORE_VERSION = 1
DEFAULT_MIN_SIDE = SAM_MIN_SIDE  # smaller images are quarantined as too_small
PRIVACY_STAGE = "privacy"
_FINGERPRINT = re.compile(r"^[0-9a-f]{8,64}$")
_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class ImageRow:
    """One ingested image as a stage sees it: ids, provenance, size and the original bytes."""

    image_id: int
    source: str
    sha256: str
    width: int
    height: int
    shard: str
    data: bytes


@dataclass
class ShardOutput:
    """What a stage produced for one shard; `Store.write_shard_output` commits it.

    masks: (image_id, MaskRecord) pairs with their final ids. images: image_id -> encoded bytes
    (JPEG/PNG) with (width, height, meta) in `image_info`. done: ids of images processed (with
    or without masks). quarantined: dicts with image_id, source, sha256, reason, detail.
    effort: annotation id -> effort dict (gears 1 and 2: clicks, iou, seconds, prefilled,
    annotator; see `tables.ANNOTATIONS`).
    """

    done: list[int] = field(default_factory=list)
    masks: list[tuple[int, MaskRecord]] = field(default_factory=list)
    effort: dict[int, dict[str, Any]] = field(default_factory=dict)
    images: dict[int, bytes] = field(default_factory=dict)
    image_info: dict[int, tuple[int, int, dict[str, Any]]] = field(default_factory=dict)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


BATCH_LEASE = "batch"  # leases/<stage>/round-<k>/batch.lock: a batch run of a gear round (no shard's name)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read_part(path: Path, schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    """One committed Parquet part of the store's tables; a damaged one is named (pyarrow's own
    error says neither the file nor what to do)."""
    try:
        return pq.read_table(path, schema=schema, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DamagedFile.reading(
            path, exc, "restore it from a backup; the store cannot be read without it"
        ) from None


def check_stage(stage: str, round_: int) -> None:
    if not _STAGE_NAME.match(stage):
        raise ValueError(
            f"stage name '{stage}' is invalid: use lower-case letters, digits, '-' or '_'"
        )
    if not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"round {round_!r} is invalid: use a model round number >= 0")


class Store:
    """A shard store folder. `Store.create` makes one; `Store(path)` opens an existing one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info = self.root / "store.json"
        if not info.is_file():
            raise ValueError(
                f"'{root}' is not a store (no store.json): run `sa-engine ingest SOURCE --store {root}`"
            )
        try:
            self.info = json.loads(info.read_text())
        except ValueError as exc:
            raise DamagedFile.reading(
                info, exc, "restore it from a backup, or copy it from a store made with the same "
                "version and limits (it holds the store's format and ingest limits)",
            ) from None
        self._manifest: tuple[tuple, pa.Table] | None = None
        self._index: tuple[tuple, pa.Table] | None = None
        self._sizes: tuple[tuple, np.ndarray, np.ndarray, np.ndarray] | None = None
        if self.info.get("format") != STORE_FORMAT or self.info.get("version") != STORE_VERSION:
            raise ValueError(f"'{root}/store.json' is not a version-{STORE_VERSION} {STORE_FORMAT}")

    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        min_side: int = DEFAULT_MIN_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> "Store":
        """Open the store at `root`, creating it (with these ingest limits) if it does not exist."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"store '{root}' is a file: pass a folder path")
        if not (root / "store.json").is_file():
            if root.is_dir() and any(root.iterdir()):
                raise ValueError(
                    f"'{root}' is a non-empty folder without store.json: pass an empty or new folder"
                )
            atomic_write_json(
                root / "store.json",
                {
                    "format": STORE_FORMAT,
                    "version": STORE_VERSION,
                    "created": utc_now(),
                    "min_side": min_side,
                    "max_pixels": max_pixels,
                },
                indent=1,
            )
        return cls(root)

    @property
    def min_side(self) -> int:
        return int(self.info["min_side"])

    @property
    def max_pixels(self) -> int:
        return int(self.info["max_pixels"])

    # ---- paths -------------------------------------------------------------------------------
    def shard_path(self, shard: str) -> Path:
        return self.root / "shards" / f"{shard}.parquet"

    def stage_dir(self, stage: str, round_: int) -> Path:
        check_stage(stage, round_)
        return self.root / "stages" / stage / f"round-{round_}"

    def output_path(self, stage: str, round_: int, shard: str, kind: str) -> Path:
        return self.stage_dir(stage, round_) / f"{shard}.{kind}.parquet"

    def done_path(self, stage: str, round_: int, shard: str) -> Path:
        return self.stage_dir(stage, round_) / f"{shard}.done.json"

    def set_aside_path(self, stage: str, round_: int, shard: str) -> Path:
        """Where a completion record goes when its files fail their sha256 (`done_record`)."""
        return self.stage_dir(stage, round_) / f"{shard}.done.json.corrupt"

    # ---- ingested data -----------------------------------------------------------------------
    def _parts(
        self, folder: str, prefix: str, schema: pa.Schema, columns: list[str] | None = None
    ) -> pa.Table:
        paths = sorted((self.root / folder).glob(f"{prefix}-*.parquet"))
        committed = {p.stem.split("-")[-1] for p in (self.root / "manifest").glob("part-*.parquet")}
        tabs = [_read_part(p, schema, columns) for p in paths if p.stem.split("-")[-1] in committed]
        if tabs:
            return pa.concat_tables(tabs)
        empty = schema.empty_table()
        return empty if columns is None else empty.select(columns)

    def _manifest_key(self) -> tuple:
        return tuple(
            (p.name, p.stat().st_mtime_ns)
            for p in sorted((self.root / "manifest").glob("part-*.parquet"))
        )

    def manifest(self) -> pa.Table:
        """Every ingested image, in image_id order (cached until an ingest adds a part)."""
        key = self._manifest_key()
        if self._manifest is None or self._manifest[0] != key:
            self._manifest = (key, self._parts("manifest", "part", tables.MANIFEST))
        return self._manifest[1]

    def manifest_columns(self, columns: list[str]) -> pa.Table:
        """These manifest columns of every image, read now and not cached: for a one-off reader
        (an ingest's dedupe reads ids, sources and sha256s, not the sizes and shards)."""
        key = self._manifest_key()
        if self._manifest is not None and self._manifest[0] == key:
            return self._manifest[1].select(columns)
        return self._parts("manifest", "part", tables.MANIFEST, columns)

    def manifest_index(self) -> pa.Table:
        """The manifest's `INDEX_COLUMNS` only (image_id, shard, bytes, width, height): what runs
        and the shard lookups read. Without the sha256 and source strings, a process reading it
        for SA-1B's 11M images peaks at 0.65 GiB, against 1.95 GiB with the whole manifest."""
        key = self._manifest_key()
        if self._index is None or self._index[0] != key:
            self._index = (key, self.manifest_columns(INDEX_COLUMNS))
        return self._index[1]

    def image_sizes(self, image_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        """image_id -> (width, height) in the store frame (EXIF applied), of these images.

        Looked up in the manifest's id, width and height columns as arrays (cached until an
        ingest adds a part): at SA-1B's 11M images a dict of every image took 3.6 s and 1.6 GiB."""
        key = self._manifest_key()
        if self._sizes is None or self._sizes[0] != key:
            index = self.manifest_index()
            ids, widths, heights = (
                index.column(name).to_numpy() for name in ("image_id", "width", "height")
            )
            order = np.argsort(ids, kind="stable")  # (the manifest is in id order: a no-op)
            self._sizes = (key, ids[order], widths[order], heights[order])
        _, ids, widths, heights = self._sizes
        wanted = np.asarray(list(image_ids), dtype=np.int64)
        at = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))
        missing = wanted[ids[at] != wanted] if len(ids) else wanted
        if len(missing):
            raise ValueError(
                f"images {missing[:5].tolist()} are not in {self.root}'s manifest: the store "
                "and its stage outputs disagree; see `sa-engine status`"
            )
        return dict(zip(wanted.tolist(), zip(widths[at].tolist(), heights[at].tolist())))

    def duplicates(self) -> pa.Table:
        return self._parts("duplicates", "part", tables.DUPLICATES)

    def ingest_quarantine(self) -> pa.Table:
        return self._parts("quarantine", "ingest", tables.QUARANTINE)

    def shards(self) -> list[str]:
        """Shard names in order (shards from later ingests sort after earlier ones)."""
        return sorted(pc.unique(self.manifest_index().column("shard")).to_pylist())

    def check_shards(self, shards: Iterable[str]) -> None:
        """Raises ValueError naming the shards that are not in the store."""
        unknown = sorted(set(shards) - set(self.shards()))
        if unknown:
            raise ValueError(
                f"shards {unknown} are not in {self.root}: see `sa-engine status {self.root}`"
            )

    def shard_sizes(self) -> dict[str, int]:
        """Shard name -> its image count (column counts: no Python list of every image)."""
        counts = pc.value_counts(self.manifest_index().column("shard"))
        return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))

    def damaged_shards(self) -> dict[str, str]:
        """Shard name -> what is wrong with its file, for each shard whose Parquet footer cannot
        be read (a file cut short) or that holds another number of images than the manifest
        lists (`status --verify`: the footer only, not every image's bytes)."""
        damaged = {}
        for shard, images in self.shard_sizes().items():
            path = self.shard_path(shard)
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowException, OSError) as exc:
                damaged[shard] = str(DamagedFile.reading(path, exc, "restore it from a backup"))
                continue
            if rows != images:
                damaged[shard] = (
                    f"{path} holds {rows} images, the manifest lists {images}: restore it from a backup"
                )
        return damaged

    def shard_images(self) -> dict[str, list[int]]:
        """Shard name -> its image ids, in manifest order (shards by first appearance)."""
        manifest = self.manifest_index()
        shards = pc.dictionary_encode(manifest.column("shard").combine_chunks())
        codes = shards.indices.to_numpy()
        order = np.argsort(codes, kind="stable")
        ends = np.cumsum(np.bincount(codes, minlength=len(shards.dictionary)))[:-1]
        ids = np.split(manifest.column("image_id").to_numpy()[order], ends)
        return {name: part.tolist() for name, part in zip(shards.dictionary.to_pylist(), ids)}

    def image_ids(self, shard: str) -> list[int]:
        """One shard's image ids, from its own file's id column (a model actor's lookup: no
        manifest, which at SA-1B's scale is gigabytes in every process that reads it)."""
        path = self.shard_path(shard)
        if not path.is_file():
            raise ValueError(
                f"shard '{shard}' is missing from {self.root}/shards: re-run ingest on its source"
            )
        return pq.read_table(path, columns=["image_id"]).column(0).to_pylist()

    def iter_shard(self, shard: str, batch_size: int = 16) -> Iterator[ImageRow]:
        """Stream a shard's images (original bytes) without loading the whole shard into memory."""
        path = self.shard_path(shard)
        if not path.is_file():
            raise ValueError(
                f"shard '{shard}' is missing from {self.root}/shards: re-run ingest on its source"
            )
        try:  # (a damaged file fails at its footer or at the row group cut short)
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                for row in batch.to_pylist():
                    yield ImageRow(
                        row["image_id"],
                        row["source"],
                        row["sha256"],
                        row["width"],
                        row["height"],
                        shard,
                        row["data"],
                    )
        except (pa.ArrowException, OSError) as exc:
            raise DamagedFile.reading(
                path, exc, "restore it from a backup (its images' outputs cannot be made without it)"
            ) from None

    def read_image(self, shard: str, image_id: int) -> ImageRow:
        """One image of a shard (a row filter: only its row group is read), e.g. for the web tool."""
        path = self.shard_path(shard)
        if not path.is_file():
            raise ValueError(
                f"shard '{shard}' is missing from {self.root}/shards: re-run ingest on its source"
            )
        rows = pq.read_table(path, filters=[("image_id", "=", int(image_id))]).to_pylist()
        if not rows:
            raise ValueError(f"image {image_id} is not in shard '{shard}' of {self.root}")
        row = rows[0]
        return ImageRow(
            row["image_id"], row["source"], row["sha256"], row["width"], row["height"], shard,
            row["data"],
        )  # fmt: skip

    # ---- stage outputs -----------------------------------------------------------------------
    def write_shard_output(
        self, stage: str, round_: int, shard: str, output: ShardOutput
    ) -> dict[str, Any]:
        """Commit one shard's output: tables first (atomically), then the completion record.

        Returns the completion record. Writing the same output twice gives the same files (ids and
        rows are deterministic), so a retried or duplicated worker cannot duplicate anything.
        """
        files: dict[str, dict[str, Any]] = {}
        masks = sorted(output.masks, key=lambda pair: pair[1].id)
        ids = [m.id for _, m in masks]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"{stage}/round-{round_}/{shard}: annotation ids repeat; ids must be unique per output"
            )
        kinds: list[tuple[str, pa.Table]] = [
            ("annotations", tables.masks_to_table(masks, stage, round_, output.effort))
        ]
        if output.images:
            rows = sorted(output.images)
            kinds.append(
                (
                    "images",
                    pa.Table.from_pydict(
                        {
                            "image_id": rows,
                            "width": [output.image_info[i][0] for i in rows],
                            "height": [output.image_info[i][1] for i in rows],
                            "data": [output.images[i] for i in rows],
                            "meta": [tables.meta_json(output.image_info[i][2]) for i in rows],
                        },
                        schema=tables.OUTPUT_IMAGES,
                    ),
                )
            )
        for kind, table in kinds:
            path = self.output_path(stage, round_, shard, kind)
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp, row_group_size=64 if kind == "images" else 10_000)
            files[path.name] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "rows": table.num_rows,
            }
        record = {
            "schema": 1,
            "stage": stage,
            "round": round_,
            "shard": shard,
            "finished_at": utc_now(),
            "counts": {
                "images": len(output.done),
                "annotations": len(masks),
                "output_images": len(output.images),
                "quarantined": len(output.quarantined),
            },
            "images": sorted(output.done),
            "quarantined": sorted(
                output.quarantined, key=lambda q: (q.get("image_id") or 0, q.get("source", ""))
            ),
            "files": files,
            "meta": output.meta,
        }
        atomic_write_json(self.done_path(stage, round_, shard), record, indent=1)
        self.set_aside_path(stage, round_, shard).unlink(missing_ok=True)  # (an older one)
        return record

    def write_shard_images(
        self,
        stage: str,
        round_: int,
        shard: str,
        images: dict[int, bytes],
        metadata: dict[int, dict[str, Any]] | None = None,
        quarantined: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Commit a shard of output images (e.g. the privacy stage's blurred JPEGs).

        Arguments:
          images (dict[int, bytes]): image_id -> encoded JPEG/PNG in the image's store frame
            (the manifest's width x height, EXIF already applied).
          metadata (dict[int, dict]): per-image metadata kept beside the bytes (e.g. face counts).
          quarantined (list[dict]): images of the shard that could not be produced, with reasons.
        """
        from engine.image_io import load_image

        info = {}
        for image_id, data in images.items():
            rgb = load_image(data, name=f"{stage} output image {image_id}")
            info[image_id] = (rgb.shape[1], rgb.shape[0], (metadata or {}).get(image_id, {}))
        output = ShardOutput(
            done=sorted(images),
            images=dict(images),
            image_info=info,
            quarantined=list(quarantined or []),
        )
        return self.write_shard_output(stage, round_, shard, output)

    def done_record(
        self, stage: str, round_: int, shard: str, check: str = "size"
    ) -> dict[str, Any] | None:
        """The completion record of a shard output, or None if it is missing or does not match
        the files on disk: such a shard must be redone.

        check: "size" (runs, gears, training: every listed file is there with its recorded size;
        a record is written after its files, each atomically, so a stopped run never leaves one
        over partial files) or "sha256" (exports and `status`: every output byte re-hashed, which
        at SA-1B's scale is terabytes, too much for each run's start). A file that no longer
        has its recorded sha256 (changed after its commit) moves the record aside to
        `<shard>.done.json.corrupt`, so the next run redoes the shard.
        """
        if check not in ("sha256", "size"):
            raise ValueError(f"check '{check}' is invalid: use 'sha256' or 'size'")
        path = self.done_path(stage, round_, shard)
        try:
            text = path.read_text()
            record = json.loads(text)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        for name, expect in record.get("files", {}).items():
            target = path.parent / name
            if not target.is_file() or target.stat().st_size != expect["bytes"]:
                return None
            if check == "sha256" and sha256_file(target) != expect["sha256"]:
                try:  # (unless a run has just committed the shard again: another record)
                    if path.read_text() == text:
                        os.replace(path, self.set_aside_path(stage, round_, shard))
                except OSError:  # gone meanwhile, or a read-only store: not done either way
                    pass
                return None
        return record

    def stage_rounds(self) -> list[tuple[str, int]]:
        """Every (stage, round) with a folder in the store, sorted."""
        out = []
        for stage_dir in sorted((self.root / "stages").glob("*")):
            for round_dir in stage_dir.glob("round-*"):
                suffix = round_dir.name.removeprefix("round-")
                if suffix.isdigit():
                    out.append((stage_dir.name, int(suffix)))
        return sorted(out)

    def rounds(self, stage: str) -> list[int]:
        """The rounds of `stage` with a folder in the store, ascending."""
        return [r for s, r in self.stage_rounds() if s == stage]

    # ---- image embeddings (gears 1 and 2) ----------------------------------------------------
    def embeddings_path(self, fingerprint: str, shard: str) -> Path:
        """Where a shard's embeddings by the image encoder with this fingerprint live."""
        if not _FINGERPRINT.match(fingerprint or ""):
            raise ValueError(
                f"encoder fingerprint {fingerprint!r} is invalid: use "
                "engine.predictor.encoder_fingerprint(model)"
            )
        return self.root / "embeddings" / fingerprint / f"{shard}.parquet"

    def embedding_ids(self, fingerprint: str, shard: str) -> set[int]:
        """Ids of the shard's images with a stored embedding by this encoder."""
        path = self.embeddings_path(fingerprint, shard)
        if not path.is_file():
            return set()
        try:
            return set(pq.read_table(path, columns=["image_id"]).column(0).to_pylist())
        except (OSError, pa.ArrowInvalid):
            return set()  # unreadable (e.g. a foreign file): treated as absent and rewritten

    def read_embedding(self, fingerprint: str, shard: str, image_id: int) -> bytes | None:
        """The stored `ImageEmbedding.to_bytes()` of one image, or None (one row group read)."""
        path = self.embeddings_path(fingerprint, shard)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(
                path, schema=tables.EMBEDDINGS, filters=[("image_id", "=", int(image_id))]
            )
        except (OSError, pa.ArrowInvalid):
            return None
        return table.column("data")[0].as_py() if table.num_rows else None

    def write_embeddings(
        self, fingerprint: str, shard: str, rows: Iterable[tuple[int, bytes]]
    ) -> int:
        """Write a shard's embeddings (streamed, one row group per image), replacing the file
        atomically. Returns the number of rows written.

        Arguments:
          fingerprint (str): `engine.predictor.encoder_fingerprint` of the encoder that made them.
          rows: (image_id, `ImageEmbedding.to_bytes()`) in any order; include the stored rows to
            keep (`read_embedding`), the file is replaced as a whole.
        """
        path = self.embeddings_path(fingerprint, shard)
        count = 0
        with atomic_path(path) as tmp:
            with pq.ParquetWriter(tmp, tables.EMBEDDINGS) as writer:
                for image_id, data in rows:
                    writer.write_table(
                        pa.Table.from_pydict(
                            {"image_id": [int(image_id)], "data": [data]}, schema=tables.EMBEDDINGS
                        )
                    )
                    count += 1
        return count

    def read_annotations(self, stage: str, round_: int, shard: str) -> pa.Table:
        return pq.read_table(
            self.output_path(stage, round_, shard, "annotations"), schema=tables.ANNOTATIONS
        )

    def iter_output_images(
        self, stage: str, round_: int, shard: str
    ) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        path = self.output_path(stage, round_, shard, "images")
        if not path.is_file():
            return
        for batch in pq.ParquetFile(path).iter_batches(batch_size=16):
            for row in batch.to_pylist():
                yield row["image_id"], row["data"], json.loads(row["meta"])

    def output_image_meta(self, stage: str, round_: int, shard: str) -> dict[int, dict[str, Any]]:
        """The meta of a shard's output images by image id, without reading the images ({} where
        the shard has no image output)."""
        path = self.output_path(stage, round_, shard, "images")
        if not path.is_file():
            return {}
        table = pq.read_table(path, columns=["image_id", "meta"])
        return {i: json.loads(m) for i, m in zip(table["image_id"].to_pylist(), table["meta"].to_pylist())}

    def quarantine(self) -> pa.Table:
        """Every input skipped anywhere (ingest and every stage's completed shards), with reasons."""
        entries = []
        for stage, round_ in self.stage_rounds():
            for shard in self.shards():
                record = self.done_record(stage, round_, shard)
                for q in (record or {}).get("quarantined", []):
                    entries.append({**q, "stage": stage, "round": round_, "shard": record["shard"]})
        return pa.concat_tables([self.ingest_quarantine(), tables.quarantine_rows(entries)])

    @contextlib.contextmanager
    def ingest_lock(self) -> Iterator[None]:
        """Hold the store's ingest lock (`STORE/.ingest.lock`, `sharding.locks`) for the block.

        An ingest numbers images and shards from what the store holds when it starts; two at once
        would hand out the same ids and shard names and overwrite each other's shards. Raises
        ValueError, naming the holder, while another process holds it."""
        path = self.root / ".ingest.lock"
        lock = locks.take(path, "run one ingest at a time")
        if lock is None:
            raise ValueError(
                f"another ingest is adding to {self.root} ({locks.holder(path) or 'it has just ended'}): "
                "two at once would hand out the same ids and shards; wait for it to end, then run this one"
            )
        try:
            yield
        finally:
            lock.release()

    def ingest_holder(self) -> str | None:
        """Who holds the ingest lock now (`ingest_lock`'s description of it), or None: no ingest
        is running."""
        return locks.holder(self.root / ".ingest.lock")

    def lease_path(self, stage: str, round_: int, shard: str) -> Path:
        check_stage(stage, round_)
        return self.root / "leases" / stage / f"round-{round_}" / f"{shard}.lock"

    def lease_shard(
        self, stage: str, round_: int, shard: str, holder: str | None = None
    ) -> locks.HeldLock | None:
        """Hold a shard of a stage output for one annotation session (`sharding.locks`; `holder`
        names the session), or None while another session holds it: two people's sessions on one
        shard would each commit their own view of it, and the later commit would drop the
        other's masks."""
        path = self.lease_path(stage, round_, shard)
        return locks.take(path, "run one annotation session per store at a time", holder)

    def lease_holder(self, stage: str, round_: int, shard: str) -> str | None:
        """Who holds a shard's lease now, or None."""
        return locks.holder(self.lease_path(stage, round_, shard))

    def hold_batch_run(self, stage: str, round_: int) -> locks.HeldLock:
        """Hold a stage round for a batch run that people's sessions also write to (gears 1 and
        2): while it is held no session takes a shard of it (`serve` says why). The run then
        leaves alone the shards sessions already hold (`leases`), so a run and a person never
        commit over each other's work. Raises ValueError while another batch run holds it."""
        path = self.lease_path(stage, round_, BATCH_LEASE)
        lock = locks.take(path, "run one batch run of a gear round at a time")
        if lock is None:
            raise ValueError(
                f"another batch run of {stage} round {round_} is running "
                f"({locks.holder(path) or 'it has just ended'}): wait for it to end, then run this one"
            )
        return lock

    def batch_holder(self, stage: str, round_: int) -> str | None:
        """Who holds a stage round's batch lock now (`hold_batch_run`), or None."""
        return locks.holder(self.lease_path(stage, round_, BATCH_LEASE))

    def leases(self) -> list[dict[str, Any]]:
        """The shards annotation sessions hold now: stage, round, shard and holder each, sorted
        (a lease file whose session has stopped is passed over)."""
        held = []
        for path in sorted((self.root / "leases").glob("*/round-*/*.lock")):
            suffix = path.parent.name.removeprefix("round-")
            holder = locks.holder(path) if suffix.isdigit() and path.stem != BATCH_LEASE else None
            if holder is not None:
                stage = path.parent.parent.name
                held.append({"stage": stage, "round": int(suffix), "shard": path.stem, "holder": holder})
        return sorted(held, key=lambda h: (h["stage"], h["round"], h["shard"]))

    def last_run_record(self, name: str) -> dict[str, Any] | None:
        """The newest run record of `name` (records are named by their start time), or None."""
        paths = sorted((self.root / "runs" / name).glob("*.json"))
        for path in reversed(paths):
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return None

    def runs_that_made(self, stage: str, round_: int, shards: Iterable[str]) -> list[dict[str, Any]]:
        """The runs that committed `shards` of a stage output, from their run records: for each,
        its record's name, start, settings (`meta`, where the runner keeps them) and package
        versions, and which of `shards` it committed. A batch run writes a shard's output anew,
        so a shard a batch run committed again later (after its output was redone) counts for
        that run only; people's sessions (`serve`) add to what is committed, so each one that
        committed a shard since counts for it too. Shards no record names are left out."""
        wanted, made_by = set(shards), {}
        for path in sorted((self.root / "runs" / stage).glob(f"*-round-{round_}.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for shard in record.get("processed", []):
                if shard in wanted:  # records sort by start
                    if record.get("annotator") == "person":
                        made_by.setdefault(shard, []).append((path.name, record))
                    else:
                        made_by[shard] = [(path.name, record)]
        runs: dict[str, dict[str, Any]] = {}
        entries = [(shard, name, record) for shard in made_by for name, record in made_by[shard]]
        for shard, name, record in sorted(entries, key=lambda e: e[:2]):
            run = runs.setdefault(name, {
                "run_record": f"runs/{stage}/{name}",
                "started_at": record.get("started_at"),
                "meta": record.get("meta", {}),
                "versions": record.get("versions", {}),
                "shards": [],
            })  # fmt: skip
            run["shards"].append(shard)
        return list(runs.values())

    def run_record_path(self, name: str, started: str, round_: int | None = None) -> Path:
        """Where the record of a run of `name` started at `started` (`utc_now`) goes:
        STORE/runs/<name>/<start>-<pid>[-round-<k>].json, so records sort by start and a stage
        round's are found by their suffix (`runs_that_made`)."""
        suffix = "" if round_ is None else f"-round-{round_}"
        return self.root / "runs" / name / f"{started.replace(':', '')}-{os.getpid()}{suffix}.json"

    @contextlib.contextmanager
    def running(self, record_path: Path) -> Iterator[None]:
        """Hold a lock beside a stage run's record (`<record>.lock`) while the run goes on.

        A run killed outright (SIGKILL, a lost machine) cannot write its record's end, which then
        says `running` forever; the kernel drops the lock with the process, so `run_holder` tells
        a run going on from one that is gone (`sharding.status` says which)."""
        path = record_path.with_suffix(".lock")
        lock = locks.take(path, "`status` cannot tell this run from a killed one")
        try:
            yield
        finally:
            if lock is not None:
                lock.release()
                path.unlink(missing_ok=True)

    def run_holder(self, record_path: Path) -> str | None:
        """Who runs the run of this record now (`running`), or None: its process has ended."""
        return locks.holder(record_path.with_suffix(".lock"))

    def last_stage_run(self, stage: str, round_: int) -> tuple[Path, dict[str, Any]] | None:
        """The newest record of a batch run of a stage round (people's sessions left out), with its
        path; None before the first."""
        for path in sorted((self.root / "runs" / stage).glob(f"*-round-{round_}.json"), reverse=True):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("annotator") != "person":
                return path, record
        return None

    def write_run_record(self, name: str, record: dict[str, Any], path: Path | None = None) -> Path:
        """Write a run record under STORE/runs/<name>/, with the package versions it ran with."""
        record = {**record, "versions": dict(package_versions())}
        path = path or self.run_record_path(name, utc_now())
        atomic_write_json(path, record, indent=1)
        return path
