"""SA-1B release export: tar shards of `sa_<id>.jpg` + `sa_<id>.json`, plus checksum lists.

Images come ONLY from the privacy stage's output (`STORE/stages/privacy/round-<k>/`), never from
the ingested originals: a shard without privacy output is refused (or, with allow_partial,
skipped and reported), and an image the privacy stage did not produce is never released.

Release folder:
    OUT/sa_NNNNNN.tar    one per store shard (shard-NNNNNN), members sorted by image id,
                         deterministic tar headers (mtime 0, uid/gid 0)
    OUT/SHA256SUMS       `<sha256>  sa_NNNNNN.tar` lines (`sha256sum -c SHA256SUMS` works)
    OUT/MEMBERS.tsv      tar, member, bytes, sha256 of every member of every tar
    OUT/release.json     annotation source (stage, round), privacy round, counts, frame
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from engine.image_io import ImageLoadError, load_image_with_info
from sharding.outputs import completed, release_name, resolve_annotation_source, shard_records
from sharding.rescale import RELEASE_SHORT_SIDE, release_size, rescale_record, resize_image
from sharding.store import PRIVACY_STAGE, Store, sha256_file, utc_now

JPEG_QUALITY = 95


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


def export_sa1b(
    store: Store,
    out_dir: str | Path,
    *,
    stage: str | None = None,
    round_: int | None = None,
    privacy_round: int | None = None,
    short_side: int = RELEASE_SHORT_SIDE,
    allow_partial: bool = False,
) -> ExportReport:
    """Write an SA-1B release of one annotation output.

    Arguments:
      stage, round_: the annotation source (default: latest completed, see `resolve_annotation_source`).
      privacy_round (int | None): which privacy output supplies the images (default: highest).
      short_side (int): release frame's shortest side (0 keeps the store frame; no upscaling).
      allow_partial (bool): skip (and report) shards without privacy output instead of refusing.
    Raises:
      ValueError: no privacy output, or shards without it and allow_partial is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "release.json").is_file():
        raise ValueError(
            f"'{out_dir}' is a non-empty folder that is not a release: pass a new or empty folder"
        )
    stage, round_ = resolve_annotation_source(store, stage, round_)
    privacy_rounds = sorted(r for s, r in store.stage_rounds() if s == PRIVACY_STAGE)
    if privacy_round is None:
        if not privacy_rounds:
            raise ValueError(
                f"{store.root} has no privacy output: run the privacy stage first; "
                "a release never contains unblurred originals"
            )
        privacy_round = privacy_rounds[-1]
    annotated = completed(store, stage, round_)
    blurred = completed(store, PRIVACY_STAGE, privacy_round)
    report = ExportReport(stage, round_, privacy_round)
    missing = [s for s in annotated if s not in blurred]
    if missing and not allow_partial:
        raise ValueError(
            f"shards {', '.join(missing)} have no privacy output (privacy round {privacy_round}): "
            "run the privacy stage on them, or pass --allow-partial to skip them"
        )
    for shard in store.shards():
        if shard not in annotated:
            report.skipped_shards[shard] = f"no finished {stage} round {round_} output" + (
                " (its output failed its sha256 check and was set aside: run the stage again)"
                if store.set_aside_path(stage, round_, shard).is_file()
                else ""
            )
        elif shard not in blurred:
            report.skipped_shards[shard] = (
                f"no privacy output (round {privacy_round}): never released unblurred"
            )
    members_lines, sums_lines = ["tar\tmember\tbytes\tsha256"], []
    for shard in store.shards():
        if shard in report.skipped_shards:
            continue
        tar_name = f"sa_{shard.split('-')[-1]}.tar"
        records = shard_records(store, stage, round_, shard, annotated[shard])
        members = _write_tar(
            store, out_dir / tar_name, shard, privacy_round, records, short_side, report
        )
        report.tars.append(tar_name)
        members_lines += [f"{tar_name}\t{name}\t{size}\t{digest}" for name, size, digest in members]
        sums_lines.append(f"{sha256_file(out_dir / tar_name)}  {tar_name}")
    for stale in out_dir.glob("sa_*.tar"):  # tars of an earlier export into this release folder
        if stale.name not in report.tars:
            stale.unlink()
    atomic_write_bytes(out_dir / "MEMBERS.tsv", ("\n".join(members_lines) + "\n").encode())
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
        },
        indent=1,
    )
    return report


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
                (f"{name}.json", json.dumps(released.to_json()).encode("utf-8")),
            ):
                info_ = tarfile.TarInfo(member)
                info_.size, info_.mtime, info_.mode = len(payload), 0, 0o644
                tar.addfile(info_, io.BytesIO(payload))
                members.append((member, len(payload), hashlib.sha256(payload).hexdigest()))
            report.images += 1
            report.annotations += len(released.annotations)
    return members
