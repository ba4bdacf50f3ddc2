"""SA-1B release export: tar shards of `sa_<id>.jpg` + `sa_<id>.json`, plus checksum lists.

Images come ONLY from the privacy stage's output (`STORE/stages/privacy/round-<k>/`), never from
the ingested originals: a shard without privacy output is refused (or, with allow_partial,
skipped and reported), and an image the privacy stage did not produce is never released.

Release folder:
    OUT/sa_NNNNNN.tar    one per store shard (shard-NNNNNN), members sorted by image id,
                         deterministic tar headers (mtime 0, uid/gid 0); each JSON's `image`
                         also says what was blurred in it: `"blurred": {"faces": n, "plates": m}`
    OUT/SHA256SUMS       `<sha256>  sa_NNNNNN.tar` lines (`sha256sum -c SHA256SUMS` works)
    OUT/MEMBERS.tsv      tar, member, bytes, sha256 of every member of every tar
    OUT/release.json     annotation source (stage, round), privacy round, counts, frame, and
                         the runs that made its masks and blurred images (their run records'
                         settings and package versions, and which shards each made)
    OUT/.export/         one record per tar: what it was made from, its sha256 and members; an
                         export stopped midway, run again, keeps the tars already written
                         (release.json is written last). Not part of the release.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from engine.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from engine.checks import invalid
from engine.image_io import ImageLoadError, load_image_with_info
from engine.provenance import package_versions, sha256_file
from engine.records import ImageRecord
from sharding.outputs import blurred_counts, completed, release_name, resolve_annotation_source, shard_records
from sharding.rescale import RELEASE_SHORT_SIDE, release_size, rescale_record, resize_image
from sharding.store import PRIVACY_STAGE, Store, utc_now

JPEG_QUALITY = 95
RESUME_DIR = ".export"  # per-tar records: what each tar was made from (not part of the release)
EXPORT_VERSION = 2  # bump when the bytes an export writes for the same inputs change


@dataclass
class ExportConfig:
    """The `export:` config block (`sa-engine export sa1b`): see `export_sa1b` for the first
    five; ray: write the tars as Ray tasks, one a shard (on ray.address / RAY_ADDRESS, else an
    embedded local Ray); cpus: CPUs one such task reserves; progress: the command's progress
    line (tars, images, masks) on stderr."""

    stage: str | None = None
    round: int | None = None
    privacy_round: int | None = None
    short_side: int = RELEASE_SHORT_SIDE
    allow_partial: bool = False
    ray: bool = False
    cpus: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.short_side, int) or self.short_side < 0:
            raise invalid(
                "export.short_side", self.short_side,
                "a number of pixels >= 0 (0 keeps the store frame)",
            )  # fmt: skip
        if not isinstance(self.cpus, (int, float)) or not self.cpus > 0:
            raise invalid("export.cpus", self.cpus, "a value > 0")


# What one shard's export came to: ("written" | "kept", tar name) or ("skipped", reason).
ShardOutcome = tuple[str, str]


class ExportCluster(Protocol):
    """Where `export_sa1b` writes the tars (`stages.export.RayExport`: Ray tasks); None: here."""

    def export_shards(
        self, store: Store, out_dir: Path, shards: list[str], source: tuple, allow_partial: bool
    ) -> Iterator[ShardOutcome]:
        """`export_shard(store, out_dir, shard, source, allow_partial)` for every shard, in
        order, each as soon as it and those before it are done."""
        ...


@dataclass
class ExportReport:
    stage: str
    round: int
    privacy_round: int
    tars: list[str] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    skipped_shards: dict[str, str] = field(default_factory=dict)
    skipped_images: dict[int, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # tars kept from a stopped or earlier export


def export_sa1b(
    store: Store,
    out_dir: str | Path,
    *,
    stage: str | None = None,
    round_: int | None = None,
    privacy_round: int | None = None,
    short_side: int = RELEASE_SHORT_SIDE,
    allow_partial: bool = False,
    cluster: ExportCluster | None = None,
    on_shard: Callable[[dict[str, Any] | None, int], None] | None = None,
) -> ExportReport:
    """Write an SA-1B release of one annotation output.

    Arguments:
      stage, round_: the annotation source (default: latest completed, see `resolve_annotation_source`).
      privacy_round (int | None): which privacy output supplies the images (default: highest).
      short_side (int): release frame's shortest side (0 keeps the store frame; no upscaling).
      allow_partial (bool): skip (and report) shards without privacy output instead of refusing.
      cluster (ExportCluster | None): write the tars there, a shard a task (the store and OUT
        must be shared storage); this process writes the lists and release.json. The same
        bytes as without.
      on_shard (Callable | None): called after each shard to export, in order, with its tar's
        record (tar, images, annotations, ...) or None (skipped), and the number of shards to
        export: a progress display.
    Raises:
      ValueError: no privacy output, or shards without it and allow_partial is False.
    """
    out_dir = Path(out_dir)
    resume = out_dir / RESUME_DIR
    if (
        out_dir.exists()
        and any(out_dir.iterdir())
        and not (out_dir / "release.json").is_file()
        and not resume.is_dir()
    ):
        raise ValueError(
            f"'{out_dir}' is a non-empty folder that is not a release: pass a new or empty folder"
        )
    stage, round_ = resolve_annotation_source(store, stage, round_)
    privacy_rounds = store.rounds(PRIVACY_STAGE)
    if privacy_round is None:
        if not privacy_rounds:
            raise ValueError(
                f"{store.root} has no privacy output: run the privacy stage first; "
                "a release never contains unblurred originals"
            )
        privacy_round = privacy_rounds[-1]
    # sizes here; each shard's bytes are checked against their sha256 when its tar is written
    annotated = completed(store, stage, round_, check="size")
    blurred = completed(store, PRIVACY_STAGE, privacy_round, check="size")
    report = ExportReport(stage, round_, privacy_round)
    missing = [s for s in annotated if s not in blurred]
    if missing and not allow_partial:
        raise ValueError(
            f"shards {', '.join(missing)} have no privacy output (privacy round {privacy_round}): "
            "run the privacy stage on them, or pass --allow-partial to skip them"
        )
    for shard in store.shards():
        if shard not in annotated:
            report.skipped_shards[shard] = _not_finished(store, stage, round_, shard)
        elif shard not in blurred:
            report.skipped_shards[shard] = (
                f"no privacy output (round {privacy_round}): never released unblurred"
            )
    resume.mkdir(parents=True, exist_ok=True)  # (from here on the folder is an export's)
    todo = [shard for shard in store.shards() if shard not in report.skipped_shards]
    source = (stage, round_, privacy_round, short_side)
    if cluster is not None:
        outcomes = cluster.export_shards(store, out_dir, todo, source, allow_partial)
    else:
        outcomes = (export_shard(store, out_dir, shard, source, allow_partial) for shard in todo)
    sums_lines, released = [], []
    with atomic_path(out_dir / "MEMBERS.tsv") as tmp, open(tmp, "w", encoding="utf-8") as members:
        members.write("tar\tmember\tbytes\tsha256\n")
        for shard, (status, value) in zip(todo, outcomes):
            if status == "skipped":
                report.skipped_shards[shard] = value
                if on_shard is not None:
                    on_shard(None, len(todo))
                continue
            if status == "kept":
                report.reused.append(value)
            done = json.loads((resume / f"{value}.json").read_text())  # one tar's members at a time
            report.tars.append(done["tar"])
            released.append(shard)
            report.images += done["images"]
            report.annotations += done["annotations"]
            report.skipped_images.update({int(k): v for k, v in done["skipped_images"].items()})
            for name, size, digest in done["members"]:
                members.write(f"{done['tar']}\t{name}\t{size}\t{digest}\n")
            sums_lines.append(f"{done['sha256']}  {done['tar']}")
            if on_shard is not None:
                on_shard(done, len(todo))
    for stale in out_dir.glob("sa_*.tar"):  # tars of an earlier export into this release folder
        if stale.name not in report.tars:
            stale.unlink()
            (resume / f"{stale.name}.json").unlink(missing_ok=True)
    atomic_write_bytes(
        out_dir / "SHA256SUMS", ("\n".join(sums_lines) + "\n").encode() if sums_lines else b""
    )
    atomic_write_json(
        out_dir / "release.json",
        {
            "format": "sa1b",
            "created": utc_now(),
            "stage": stage,
            "round": round_,
            "privacy_round": privacy_round,
            "short_side": short_side,
            "tars": report.tars,
            "images": report.images,
            "annotations": report.annotations,
            "skipped_shards": report.skipped_shards,
            "skipped_images": {str(k): v for k, v in report.skipped_images.items()},
            # what made the released masks and blurred images: each run's settings and versions
            "made_by": {
                "annotations": store.runs_that_made(stage, round_, released),
                "privacy": store.runs_that_made(PRIVACY_STAGE, privacy_round, released),
            },
            "exported_with": dict(package_versions()),
        },
        indent=1,
    )
    return report


def _not_finished(store: Store, stage: str, round_: int, shard: str) -> str:
    return f"no finished {stage} round {round_} output" + (
        " (its output failed its sha256 check and was set aside: run the stage again)"
        if store.set_aside_path(stage, round_, shard).is_file()
        else ""
    )


def export_shard(
    store: Store, out_dir: Path, shard: str, source: tuple, allow_partial: bool
) -> ShardOutcome:
    """One shard's tar and its record (`OUT/.export/<tar>.json`: what the tar was made from, its
    sha256, members and counts), written where this runs. A tar whose record names the same
    inputs (the two completion records, which list every output's sha256, and the export
    settings `source` = (stage, round, privacy round, short side)) and whose bytes still match
    its sha256 is kept as it is: a stopped export, run again, goes on from there. Otherwise the
    shard's outputs are checked against their sha256 and the tar is written.

    Raises ValueError when the privacy output fails its check and `allow_partial` is False."""
    stage, round_, privacy_round, short_side = source
    tar_name = f"sa_{shard.split('-')[-1]}.tar"
    path, record_path = out_dir / tar_name, out_dir / RESUME_DIR / f"{tar_name}.json"
    try:
        inputs = [
            sha256_file(store.done_path(s, r, shard))
            for s, r in ((stage, round_), (PRIVACY_STAGE, privacy_round))
        ]
    except FileNotFoundError:  # a record set aside (or a shard redone) since the export began
        return "skipped", _not_finished(store, stage, round_, shard)
    key = json.dumps([EXPORT_VERSION, stage, round_, privacy_round, short_side, JPEG_QUALITY, inputs])
    try:
        old = json.loads(record_path.read_text())
    except (OSError, ValueError):
        old = None
    kept = old is not None and old.get("key") == key and path.is_file()
    if kept and sha256_file(path) == old["sha256"]:
        return "kept", tar_name
    annotation_record = store.done_record(stage, round_, shard, "sha256")
    if annotation_record is None:
        return "skipped", _not_finished(store, stage, round_, shard)
    if store.done_record(PRIVACY_STAGE, privacy_round, shard, "sha256") is None:
        why = (
            f"its privacy output (round {privacy_round}) failed its sha256 check and was set "
            "aside: run the privacy stage again"
        )
        if not allow_partial:
            raise ValueError(f"shard {shard}: {why}, or pass --allow-partial to skip it")
        return "skipped", why
    records = shard_records(store, stage, round_, shard, annotation_record)
    counts = ExportReport(stage, round_, privacy_round)
    members = _write_tar(store, path, shard, privacy_round, records, short_side, counts)
    done = {
        "key": key,
        "tar": tar_name,
        "sha256": sha256_file(path),
        "images": counts.images,
        "annotations": counts.annotations,
        "skipped_images": {str(k): v for k, v in counts.skipped_images.items()},
        "members": members,
    }
    atomic_write_json(record_path, done)
    return "written", tar_name


def _write_tar(
    store: Store,
    path: Path,
    shard: str,
    privacy_round: int,
    records: dict,
    short_side: int,
    report: ExportReport,
) -> list[tuple[str, int, str]]:
    import cv2

    members: list[tuple[str, int, str]] = []
    images = {
        i: (data, meta)
        for i, data, meta in store.iter_output_images(PRIVACY_STAGE, privacy_round, shard)
    }
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for image_id in sorted(records):
            if image_id not in images:
                report.skipped_images[image_id] = (
                    "the privacy stage produced no image (see quarantine)"
                )
                continue
            record = records[image_id]
            data = images[image_id][0]
            try:
                rgb, info = load_image_with_info(data, name=f"privacy output of image {image_id}")
            except ImageLoadError as err:
                report.skipped_images[image_id] = f"privacy output unreadable: {err.detail}"
                continue
            if (rgb.shape[1], rgb.shape[0]) != (record.image.width, record.image.height):
                report.skipped_images[image_id] = (
                    "privacy output size differs from the annotated frame"
                )
                continue
            width, height = release_size(rgb.shape[1], rgb.shape[0], short_side)
            if (
                (width, height) == (rgb.shape[1], rgb.shape[0])
                and data[:2] == b"\xff\xd8"
                and not info.exif_rotated
            ):
                jpeg = data  # already a JPEG in the release frame: no second lossy encode
            else:
                ok, buf = cv2.imencode(
                    ".jpg",
                    cv2.cvtColor(resize_image(rgb, width, height), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY],
                )
                jpeg = buf.tobytes()
            released = rescale_record(record, width, height)
            name = release_name(image_id)
            for member, payload in (
                (f"{name}.jpg", jpeg),
                (f"{name}.json", json.dumps(_with_blurred(released, images[image_id][1])).encode()),
            ):
                info_ = tarfile.TarInfo(member)
                info_.size, info_.mtime, info_.mode = len(payload), 0, 0o644
                tar.addfile(info_, io.BytesIO(payload))
                members.append((member, len(payload), hashlib.sha256(payload).hexdigest()))
            report.images += 1
            report.annotations += len(released.annotations)
    return members


def _with_blurred(record: ImageRecord, privacy_meta: dict[str, Any]) -> dict[str, Any]:
    """The SA-1B JSON of a released image, its `image` entry also saying what was blurred in it
    (`{"faces": n, "plates": m}`, from its privacy output)."""
    doc = record.to_json()
    doc["image"]["blurred"] = blurred_counts(privacy_meta)
    return doc
