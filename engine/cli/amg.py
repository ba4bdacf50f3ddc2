"""`sa-engine amg`: the automatic mask generator over images, one SA-1B JSON per image.

Settings come from a config (`--config sa1b | meta-default | FILE`, blocks `model:` and `amg:`)
plus `--set block.key=value`; the model flags are shorthands for `model.*` keys. Re-runs skip
images whose JSON exists; unreadable inputs are listed in `OUT/skipped.jsonl` and the run goes on;
`OUT/inputs.jsonl` keeps each input's output name and image id across runs (`assign_outputs`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.cli.common import (
    check_out_folder,
    config_option,
    fail,
    files_under,
    model_config,
    set_option,
)

ConfigOpt = config_option("model: and amg: blocks")
SetOpt = set_option("amg.points_per_side=16")

LIST_SUFFIXES = {".txt", ".lst", ".list"}
SKIPPED_FILE = "skipped.jsonl"
SETTINGS_FILE = "settings.json"  # the settings OUT's masks were made with (`_settings`)
INDEX_FILE = "inputs.jsonl"  # each input's output and image id, kept across runs (`assign_outputs`)


def list_inputs(
    source: Path, out: Path | None = None, unreadable: list[tuple[Path, str]] | None = None
) -> list[tuple[Path, Path]]:
    """INPUT -> [(image path, output name relative to OUT, without ".json")], sorted.

    An image file; a folder (searched recursively for image suffixes, leaving out hidden files
    and anything inside `out`, such as a previous run's overlays; outputs mirror its tree,
    named by each file's stem, or by its whole name where two files of a folder share a stem:
    a.jpg and a.png -> a.jpg.json, a.png.json); or a list file (.txt/.lst: one path per line,
    relative paths from the list's folder, '#' comments; outputs flat, by stem, -2, -3... for
    repeated stems). Listed paths are taken as given, so unreadable ones reach the skipped file.
    No two inputs get the same output. Folders that cannot be listed go to `unreadable`.
    """
    from engine.image_io import IMAGE_SUFFIXES

    if source.is_dir():
        files = [p for p in files_under(source, out, unreadable) if p.suffix.lower() in IMAGE_SUFFIXES]
        stems: dict[Path, int] = {}
        for p in files:
            key = p.relative_to(source).with_name(p.stem)
            stems[key] = stems.get(key, 0) + 1
        names = []
        for p in files:
            rel = p.relative_to(source)
            names.append(rel if stems[rel.with_name(p.stem)] > 1 else rel.with_name(p.stem))
        return list(zip(files, _unique(names)))
    if not source.exists():
        raise ValueError(f"{source} does not exist: pass an image, a folder or a list file")
    if source.suffix.lower() in LIST_SUFFIXES:
        entries, seen = [], set()
        for line in source.read_text(encoding="utf-8-sig").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path = Path(os.path.normpath(line if Path(line).is_absolute() else source.parent / line))
            if path not in seen:  # ("a.jpg", "./a.jpg": one image, run once)
                seen.add(path)
                entries.append(path)
        return list(zip(entries, _unique([Path(path.stem) for path in entries])))
    return [(source, Path(source.stem))]


def _unique(names: list[Path]) -> list[Path]:
    """The names, a repeated one suffixed -2, -3, ... (skipping any name already taken)."""
    taken = set(names)
    seen: set[Path] = set()
    out = []
    for name in names:
        if name in seen:
            n = 2
            while name.with_name(f"{name.name}-{n}") in taken:
                n += 1
            name = name.with_name(f"{name.name}-{n}")
            taken.add(name)
        seen.add(name)
        out.append(name)
    return out


def assign_outputs(inputs: list[tuple[Path, Path]], input: Path, out: Path) -> list[tuple[int, Path, Path]]:
    """`list_inputs`' (image, name) pairs -> [(image_id, image, output JSON)], the same for an
    input on every run into OUT, whatever was added to INPUT since.

    The names `list_inputs` gives depend on the other inputs (`a.jpg` alone writes a.json; with an
    a.png beside it, a.jpg.json), and so did the image ids (the position in the listing). So OUT
    keeps `OUT/inputs.jsonl`, one line per input ever assigned (`input`: its path relative to
    INPUT's folder, `output`, `image_id`): a known input keeps its output and id; a new one takes
    its listed name unless an earlier input holds it (then its whole file name, or -2, -3, ...) and
    the next id. Without the file (a first run, or an OUT from before it) names and ids are the
    listing's, as they were."""
    base = input if input.is_dir() else input.parent
    index_path = out / INDEX_FILE
    index: dict[str, dict] = {}
    if index_path.is_file():
        for line in index_path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                index[entry["input"]] = {"output": entry["output"], "image_id": int(entry["image_id"])}
            except (ValueError, KeyError, TypeError):
                continue  # (a line not written by this command)
    first_run = not index
    taken = {entry["output"] for entry in index.values()}
    next_id = max((e["image_id"] for e in index.values()), default=0) + 1
    assigned = []
    for position, (source, name) in enumerate(inputs, 1):
        key = Path(os.path.relpath(source, base)).as_posix()
        if key not in index:
            if first_run:
                output, image_id = output_path(out, name), position
            else:
                output, image_id = _free_output(out, source, name, taken), next_id
                next_id += 1
            index[key] = {"output": output.relative_to(out).as_posix(), "image_id": image_id}
            taken.add(index[key]["output"])
        assigned.append((index[key]["image_id"], source, out / index[key]["output"]))
    from engine.atomic import atomic_write_bytes

    entries = sorted(index.items(), key=lambda kv: kv[1]["image_id"])
    lines = "".join(json.dumps({"input": key, **entry}) + "\n" for key, entry in entries)
    atomic_write_bytes(index_path, lines.encode())
    return assigned


def _free_output(out: Path, source: Path, name: Path, taken: set[str]) -> Path:
    """The output of a new input: its listed name, else its whole file name, else -2, -3, ...
    (never one an earlier input of this OUT holds)."""
    for candidate in (name, name.with_name(source.name)):
        path = output_path(out, candidate)
        if path.relative_to(out).as_posix() not in taken:
            return path
    n = 2
    while f"{(name.parent / name.name).as_posix()}-{n}.json" in taken:
        n += 1
    return output_path(out, name.with_name(f"{name.name}-{n}"))


def output_path(out: Path, name: Path) -> Path:
    """OUT/<name>.json (the name may hold dots: photo.v2 -> photo.v2.json)."""
    return out / name.parent / (name.name + ".json")


def amg(
    input: Annotated[Path, typer.Argument(help="An image, a folder (recursive) or a list file.")],
    out: Annotated[Path, typer.Option(help="Output folder: <name>.json per image.")] = Path(
        "out/amg"
    ),
    config: ConfigOpt = "sa1b",
    set_: SetOpt = None,
    model: Annotated[
        Optional[str], typer.Option(help="model.model: vit_b | vit_l | vit_h | JSON config.")
    ] = None,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="model.checkpoint: SAM state dict (.pth).")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="model.device: auto | cpu | cuda.")] = None,
    bf16: Annotated[
        Optional[bool], typer.Option("--bf16/--no-bf16", help="model.bf16: bfloat16 autocast.")
    ] = None,
    overlay: Annotated[
        bool, typer.Option("--overlay", help="Also write <name>_overlay.png, one colour per mask.")
    ] = False,
    threads: Annotated[
        int,
        typer.Option(
            min=0,
            help="torch threads (0: torch's default, one per core). On a machine where other "
            "work takes cores, fewer: torch's waiting threads spin (1 thread: ~2x faster there).",
        ),
    ] = 0,
    redo: Annotated[
        bool,
        typer.Option(
            "--redo",
            help="Run every image again, those already done included (needed to run into an OUT "
            "made with other settings).",
        ),
    ] = False,
) -> None:
    """Generate masks automatically (gear 3) with the SA-1B settings or any config.

    Writes OUT/<name>.json ({"image": {...}, "annotations": [...]}, COCO RLE) per image, skips
    images already done, and lists unreadable inputs with their reason in OUT/skipped.jsonl.
    OUT/settings.json keeps the settings the masks were made with: a run with other settings
    is refused unless --redo.
    """
    from engine.cli.config import load_config, section

    check_out_folder(out, "the SA-1B records")
    overrides = list(set_ or [])
    for key, value in (
        ("model", model),
        ("checkpoint", checkpoint),
        ("device", device),
        ("bf16", bf16),
    ):
        if value is not None:
            overrides.append(f"model.{key}={json.dumps(str(value) if isinstance(value, Path) else value)}")
    from engine.amg_config import AmgConfig

    try:
        settings = load_config(config, overrides)
        amg_cfg = section(settings, "amg", AmgConfig)
        unreadable: list[tuple[Path, str]] = []
        inputs = list_inputs(input, out, unreadable)
    except ValueError as exc:
        fail(str(exc))
    if not inputs and unreadable:
        fail(f"{unreadable[0][0]}: folder cannot be listed ({unreadable[0][1]}): make it readable")
    if not inputs:
        from engine.image_io import IMAGE_SUFFIXES

        fail(f"{input}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    model_cfg = model_config(settings)
    made_with = _settings(amg_cfg, model_cfg)
    changed = _changed_settings(out, made_with)
    if changed and not redo:
        fail(
            f"{out} holds masks made with other settings ({'; '.join(changed)}): a re-run would "
            "keep them for the images already done; pass another --out, or --redo to run every "
            "image again with these"
        )

    import torch

    if threads:
        torch.set_num_threads(threads)
    from engine.amg import SamAutomaticMaskGenerator
    from engine.model import load_model

    try:
        sam = load_model(model_cfg)
        generator = SamAutomaticMaskGenerator.from_config(sam, amg_cfg)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    from engine.atomic import atomic_write_json

    atomic_write_json(out / SETTINGS_FILE, made_with, indent=1)
    todo = assign_outputs(inputs, input, out)
    pending = [item for item in todo if redo or not _done(item[2])]
    _forget_skipped(out, {str(src) for _, src, _ in pending} | {str(f) for f, _ in unreadable})
    for folder, error in unreadable:  # its images are unknown: listed, not lost silently
        _skip(out, folder, "unreadable", f"folder cannot be listed ({error}): make it readable and run again")
    typer.echo(
        f"{len(todo)} image(s), {len(todo) - len(pending)} already done, {len(pending)} to run "
        f"(config {config}, model {model_cfg.model} on {sam.device}, "
        f"{torch.get_num_threads()} torch thread(s))",
        err=True,
    )
    stats = {"images": 0, "masks": 0, "skipped": len(unreadable), "start": time.perf_counter()}

    def show(item) -> str:
        if item is None or not stats["images"]:
            return ""
        rate = stats["images"] / (time.perf_counter() - stats["start"])
        return f"{rate:.2f} images/s, {stats['masks'] / stats['images']:.1f} masks/image"

    autocast = (
        torch.autocast(device_type=sam.device.type, dtype=torch.bfloat16)
        if model_cfg.bf16
        else None
    )
    with typer.progressbar(pending, label="amg", item_show_func=show, file=None) as bar:
        for image_id, source, target in bar:
            _one(generator, image_id, source, target, out, overlay, autocast, stats)
    typer.echo(
        f"done: {stats['images']} image(s), {stats['masks']} masks, {stats['skipped']} skipped"
        + (f" (see {out / SKIPPED_FILE})" if stats["skipped"] else ""),
        err=True,
    )
    if stats["skipped"] and not stats["images"] and len(pending) == len(todo):
        raise typer.Exit(code=1)  # every input unreadable: nothing made (as `blur` ends)


def _settings(amg_cfg, model_cfg) -> dict[str, object]:
    """What decides an image's masks, as `block.key`: the `amg:` block, the model and its
    checkpoint (files by name and size: the same file named by another path, or moved, is the
    same), bf16 (the device does not count: a GPU gives the CPU's masks in float32)."""
    import dataclasses

    def named(value: str | None) -> str | None:
        path = Path(value) if value is not None else None
        return f"{path.name} ({path.stat().st_size} bytes)" if path and path.is_file() else value

    return {
        **{f"amg.{k}": v for k, v in dataclasses.asdict(amg_cfg).items()},
        "model.model": named(model_cfg.model),
        "model.checkpoint": named(model_cfg.checkpoint),
        "model.bf16": model_cfg.bf16,
    }


def _changed_settings(out: Path, made_with: dict[str, object]) -> list[str]:
    """`key: before -> now` for each setting that differs from OUT's settings file (none when OUT
    has no such file: a first run, or an OUT from before it)."""
    try:
        before = json.loads((out / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return []
    made_with = json.loads(json.dumps(made_with))  # (tuples as the file has them: lists)
    return [
        f"{key}: {before.get(key)!r} -> {made_with.get(key)!r}"
        for key in sorted(set(before) | set(made_with))
        if before.get(key) != made_with.get(key)
    ]


def _done(target: Path) -> bool:
    try:
        data = json.loads(target.read_text())
        return isinstance(data, dict) and "annotations" in data
    except (OSError, ValueError):
        return False


def _one(generator, image_id, source, target, out, overlay, autocast, stats) -> None:
    import contextlib

    from engine.amg import image_record
    from engine.image_io import SAM_MIN_SIDE, ImageLoadError, load_image_with_info
    from sharding.runner import annotation_id

    try:
        pixels, info = load_image_with_info(source, min_side=SAM_MIN_SIDE)  # (as a store takes them)
    except (ImageLoadError, OSError) as exc:
        _skip(out, source, getattr(exc, "reason", type(exc).__name__), str(exc))
        stats["skipped"] += 1
        return
    if info.frames > 1:  # (an animated GIF: said, not silent)
        typer.echo(f"note: {source} has {info.frames} frames: only the first is segmented", err=True)
    with autocast if autocast is not None else contextlib.nullcontext():
        records = generator.generate(pixels)
    height, width = pixels.shape[:2]
    record = image_record(records, image_id, width, height, source.name)
    for index, annotation in enumerate(record.annotations):  # unique across OUT, as in a store
        annotation.id = annotation_id(image_id, index)
    target.parent.mkdir(parents=True, exist_ok=True)
    if overlay:
        _write_overlay(pixels, record, target.with_name(target.stem + "_overlay.png"))
    record.write(target)
    stats["images"] += 1
    stats["masks"] += len(record.annotations)


def _forget_skipped(out: Path, retried: set[str]) -> None:
    """Drop the skipped file's lines of the inputs this run tries again (a re-run lists each
    input still unreadable once, and none that now worked); other inputs' lines stay."""
    from engine.atomic import atomic_write_bytes

    path = out / SKIPPED_FILE
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _skipped_input(line) not in retried]
    if len(kept) < len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _skipped_input(line: str) -> str | None:
    try:
        return json.loads(line).get("input")
    except (ValueError, AttributeError):
        return None  # (a line not written by this command: kept)


def _skip(out: Path, source: Path, reason: str, detail: str) -> None:
    line = json.dumps({"input": str(source), "reason": reason, "detail": detail})
    with open(out / SKIPPED_FILE, "a") as handle:
        handle.write(line + "\n")


def _write_overlay(pixels, record, path: Path) -> None:
    from engine import rle
    from engine.atomic import atomic_write_bytes
    from engine.visualize import encode_png, overlay_masks

    ordered = sorted(record.annotations, key=lambda a: -a.area)
    masks = (rle.decode(a.segmentation) for a in ordered)
    atomic_write_bytes(path, encode_png(overlay_masks(pixels, masks)))


def register(app: typer.Typer) -> None:
    app.command(name="amg")(amg)
