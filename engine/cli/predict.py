"""`sa-engine predict`: prompt SAM with points and/or a box on one image; write masks, JSON, overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.cli.common import (
    Device,
    check_out_folder,
    config_option,
    fail,
    model_config,
    model_sets,
    set_option,
)

ConfigOpt = config_option("model: block")
SetOpt = set_option("model.bf16=true")


def parse_point(text: str) -> tuple[float, float, int]:
    """'x,y' or 'x,y,label' (label 1 foreground, 0 background) -> (x, y, label)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise ValueError(
            f"--point '{text}': expected x,y or x,y,label with label 1 (foreground) or 0 (background)"
        ) from None
    if label not in (0, 1):
        raise ValueError(f"--point '{text}': label must be 1 (foreground) or 0 (background)")
    return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'x0,y0,x1,y1' (XYXY pixels) -> a tuple, with x0 < x1 and y0 < y1."""
    try:
        x0, y0, x1, y1 = (float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(
            f"--box '{text}': expected x0,y0,x1,y1 (top-left and bottom-right corners, pixels)"
        ) from None
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"--box '{text}': need x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def predict(
    image: Annotated[Path, typer.Argument(help="Image file (JPEG, PNG, ...).")],
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="SAM state dict (.pth), e.g. sam_vit_b_01ec64.pth.")
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            help="model.model: default (the bundled model, no --checkpoint needed; the config's "
            "default), vit_b, vit_l, vit_h, or a JSON model config path."
        ),
    ] = None,
    point: Annotated[
        Optional[list[str]],
        typer.Option(help="x,y[,label] in pixels; label 1 fg (default), 0 bg. Repeatable."),
    ] = None,
    box: Annotated[Optional[str], typer.Option(help="x0,y0,x1,y1 box in pixels (XYXY).")] = None,
    multimask: Annotated[
        bool, typer.Option("--multimask", help="Return 3 masks (ambiguous prompts) instead of 1.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/predict"),
    device: Annotated[
        Optional[Device], typer.Option(help="model.device (auto: CUDA when present, else CPU).")
    ] = None,
    bf16: Annotated[
        bool,
        typer.Option("--bf16", help="model.bf16: bfloat16 autocast (GPU, and CPUs with bf16)."),
    ] = False,
    embedding: Annotated[
        Optional[Path], typer.Option(help="Use a saved image embedding (.npz) instead of encoding.")
    ] = None,
    save_embedding: Annotated[
        Optional[Path], typer.Option(help="Also save the image embedding (.npz) here.")
    ] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Run without a checkpoint (tests, benchmarks).")
    ] = False,
    config: ConfigOpt = "sa1b",
    set_: SetOpt = None,
) -> None:
    """Prompt SAM with points and/or a box on one image.

    The model is the config's `model:` block (default: the bundled model); --model /
    --checkpoint / --device / --bf16 override it. Writes into --out: <stem>.json (SA-1B record:
    COCO RLE, bbox XYWH, area, predicted_iou, stability_score), <stem>_mask<i>.png (0/255) and
    <stem>_overlay.png (masks, points, box).
    """
    try:
        points = [parse_point(p) for p in point or []]
        box_xyxy = parse_box(box) if box else None
    except ValueError as exc:
        fail(str(exc))
    if not points and box_xyxy is None:
        fail("give at least one --point x,y[,label] or a --box x0,y0,x1,y1")
    check_out_folder(out, "the masks and the record")
    from engine.cli.config import load_config

    try:
        settings = load_config(config, model_sets(set_, model, checkpoint, device, bf16))
    except ValueError as exc:
        fail(str(exc))
    model_cfg = model_config(settings, random_weights)

    from engine.image_io import ImageLoadError, load_image

    try:
        pixels = load_image(image)
    except ImageLoadError as exc:
        fail(str(exc))
    height, width = pixels.shape[:2]
    for x, y, _ in points:
        if not (0 <= x < width and 0 <= y < height):
            fail(f"--point {x:g},{y:g} lies outside {image} ({width}x{height} pixels)")
    if box_xyxy is not None:  # (over the edges: the model clips it; beside the image: no prompt)
        x0, y0, x1, y1 = box_xyxy
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            fail(
                f"--box {x0:g},{y0:g},{x1:g},{y1:g} does not overlap {image} ({width}x{height} pixels)"
            )

    import numpy as np
    import torch

    from engine.model import load_model
    from engine.predictor import ImageEmbedding, SamPredictor

    try:
        sam = load_model(model_cfg)
        state = ImageEmbedding.load(embedding) if embedding is not None else None
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    predictor = SamPredictor(sam, autocast_dtype=torch.bfloat16 if model_cfg.bf16 else None)
    if state is not None:
        if tuple(state.original_size) != (height, width):
            fail(
                f"--embedding {embedding} was computed for a {state.original_size[1]}x{state.original_size[0]} "
                f"image, not {image} ({width}x{height})"
            )
        try:
            predictor.set_image_state(state)
        except ValueError as exc:
            fail(f"--embedding {embedding}: {exc}")
    else:
        predictor.set_image(pixels)
    if save_embedding is not None:
        predictor.get_image_state().save(save_embedding)

    coords = np.array([[x, y] for x, y, _ in points], float) if points else None
    labels = np.array([label for _, _, label in points], np.int64) if points else None
    box_array = np.array(box_xyxy, float) if box_xyxy is not None else None
    logits, scores, _ = predictor.predict(
        coords, labels, box_array, multimask_output=multimask, return_logits=True
    )
    record = _record(image, logits, scores, coords, box_array, sam.mask_threshold)
    masks = logits > sam.mask_threshold

    from engine.atomic import atomic_write_bytes
    from engine.visualize import draw_masks, encode_png

    out.mkdir(parents=True, exist_ok=True)
    stem = image.stem
    record.write(out / f"{stem}.json")
    for i, mask in enumerate(masks):
        atomic_write_bytes(out / f"{stem}_mask{i}.png", encode_png(mask.astype(np.uint8) * 255))
    captions = [
        f"mask {a.id}  iou {a.predicted_iou:.3f}  stability {a.stability_score:.3f}"
        for a in record.annotations
    ]
    overlay = draw_masks(pixels, masks, coords, labels, box_array, captions)
    atomic_write_bytes(out / f"{stem}_overlay.png", encode_png(overlay))
    for a in record.annotations:
        typer.echo(
            f"mask {a.id}: predicted_iou {a.predicted_iou:.3f} stability {a.stability_score:.3f} "
            f"area {a.area} bbox {a.bbox}"
        )
    typer.echo(
        f"wrote {out / f'{stem}.json'}, {len(masks)} mask PNG(s) and {out / f'{stem}_overlay.png'}"
    )


def _record(image_path: Path, logits, scores, coords, box, mask_threshold: float):
    """SA-1B record of the predicted masks: full-image crop box, the prompt points as point_coords."""
    import torch

    from engine import rle
    from engine.mask_ops import box_xyxy_to_xywh, masks_to_boxes_xyxy, stability_score
    from engine.records import ImageMeta, ImageRecord, MaskRecord

    logits_t = torch.from_numpy(logits)
    masks = logits_t > mask_threshold
    stability = stability_score(logits_t, mask_threshold, 1.0)
    boxes = box_xyxy_to_xywh(masks_to_boxes_xyxy(masks))
    height, width = masks.shape[-2:]
    prompt_points = coords.tolist() if coords is not None else []  # a box-only prompt has no point
    annotations = [
        MaskRecord(
            id=i,
            segmentation=segmentation,
            bbox=[int(v) for v in boxes[i]],
            area=int(masks[i].sum()),
            predicted_iou=float(scores[i]),
            stability_score=float(stability[i]),
            crop_box=[0, 0, int(width), int(height)],
            point_coords=prompt_points,
        )
        for i, segmentation in enumerate(rle.encode(masks.numpy()))
    ]
    meta = ImageMeta(image_id=0, width=int(width), height=int(height), file_name=image_path.name)
    return ImageRecord(meta, annotations)


def register(app: typer.Typer) -> None:
    app.command(name="predict")(predict)
