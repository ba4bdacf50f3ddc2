"""`sa-engine blur`: blur faces and licence plates in an image or a folder (recursive).

Writes the blurred images under OUT with the inputs' relative paths (same names and formats;
pixels in the EXIF-applied frame, metadata such as EXIF GPS dropped), `OUT/detections.jsonl`
(one line per detection: file, kind, box XYXY in the image's pixels, score) and `OUT/report.json`
(counts, skipped inputs with reasons, detectors with their weights' checksums and licences).
An input that cannot be read is reported and skipped; the run goes on, and it is never copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from engine.cli.common import check_out_folder, config_option, fail, files_under, set_option

ConfigOpt = config_option("privacy: block")
SetOpt = set_option("privacy.face_score=0.8")

_CV2_FORMATS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_inputs(
    source: Path, out: Path, unreadable: list[tuple[Path, str]] | None = None
) -> list[tuple[Path, str]]:
    """(path, relative name) of every file under `source` (or `source` itself), sorted; hidden
    files and anything inside `out` are left out; folders that cannot be listed go to
    `unreadable`."""
    if source.is_file():
        return [(source, source.name)]
    if not source.is_dir():
        raise ValueError(f"input '{source}' does not exist: pass an image file or a folder")
    return [
        (path, path.relative_to(source).as_posix()) for path in files_under(source, out, unreadable)
    ]


def encode_like(image, name: str, jpeg_quality: int) -> bytes:
    """Encode HxWx3 uint8 RGB in the format `name`'s extension asks for (JPEG if unknown)."""
    import io

    import cv2
    from PIL import Image

    ext = Path(name).suffix.lower()
    if ext in _CV2_FORMATS:
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg") else []
        ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
        if ok:
            return buf.tobytes()
    buffer = io.BytesIO()
    pil_format = Image.registered_extensions().get(ext, "JPEG")
    Image.fromarray(image).save(buffer, pil_format)
    return buffer.getvalue()


def blur(
    input: Annotated[
        Path, typer.Argument(help="An image file or a folder (searched recursively).")
    ],
    out: Annotated[Path, typer.Option(help="Output folder (blurred images, detections.jsonl).")],
    config: ConfigOpt = "sa1b",
    set_: SetOpt = None,
) -> None:
    """Blur faces and licence plates in an image or a folder; write detections.jsonl."""
    from engine.atomic import atomic_write_bytes, atomic_write_json
    from engine.cli.config import load_config, section
    from engine.image_io import ImageLoadError, load_image_with_info
    from engine.privacy import PrivacyConfig, PrivacyFilter

    check_out_folder(out, "the blurred images")
    try:
        cfg = section(load_config(config, set_ or []), "privacy", PrivacyConfig)
        if input.exists() and (
            out.resolve() == input.resolve()
            or (input.is_file() and out.resolve() == input.parent.resolve())
        ):
            raise ValueError(
                f"--out '{out}' would overwrite the originals: pass a different folder"
            )
        unreadable: list[tuple[Path, str]] = []
        inputs = list_inputs(input, out, unreadable)
        privacy = PrivacyFilter(cfg)
    except ValueError as err:
        fail(str(err))
    if not inputs and not unreadable:
        fail(f"'{input}' holds no files: pass an image or a folder of images")
    out.mkdir(parents=True, exist_ok=True)
    lines, skipped, notes, counts = [], [], [], {"images": 0, "faces": 0, "plates": 0}
    for folder, error in unreadable:  # its files are unknown: listed, not lost silently
        rel = folder.relative_to(input).as_posix() if folder.is_relative_to(input) else str(folder)
        detail = f"folder cannot be listed ({error}): make it readable and run again"
        skipped.append({"file": rel, "reason": "unreadable", "detail": detail})
        typer.echo(f"skipped {rel}: {detail}", err=True)
    for path, rel in inputs:
        try:
            rgb, info = load_image_with_info(path, name=rel)
            result = privacy.blur(rgb)
            data = encode_like(result.image, rel, cfg.jpeg_quality)
        except ImageLoadError as err:
            skipped.append(
                {"file": rel, "reason": err.reason, "detail": f"{err.detail} ({err.fix})"}
            )
            typer.echo(f"skipped {rel}: {err.detail} ({err.fix})", err=True)
            continue
        except Exception as exc:  # one bad image never stops the run
            skipped.append(
                {"file": rel, "reason": "error", "detail": f"{type(exc).__name__}: {exc}"}
            )
            typer.echo(f"skipped {rel}: {type(exc).__name__}: {exc}", err=True)
            continue
        if info.frames > 1:  # written as one still picture: said, not silent
            note = f"{info.frames} frames: only the first is blurred and written"
            notes.append({"file": rel, "note": note})
            typer.echo(f"note: {rel} has {note}", err=True)
        atomic_write_bytes(out / rel, data)
        lines += [json.dumps({"file": rel, **d.to_json()}) for d in result.detections]
        found = result.counts()
        counts["images"] += 1
        counts["faces"] += found["faces"]
        counts["plates"] += found["plates"]
        typer.echo(f"{rel}: {found['faces']} faces, {found['plates']} plates")
    atomic_write_bytes(out / "detections.jsonl", "".join(f"{line}\n" for line in lines).encode())
    atomic_write_json(
        out / "report.json",
        {"input": str(input), **counts, "skipped": skipped, "notes": notes, **privacy.run_metadata()},
        indent=1,
    )
    typer.echo(
        f"blurred {counts['images']} images ({counts['faces']} faces, {counts['plates']} plates) "
        f"into {out}; skipped {len(skipped)}" + (" (see report.json)" if skipped else "")
    )
    if skipped and not counts["images"]:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command(name="blur")(blur)
