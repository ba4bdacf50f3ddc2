"""Gear 3 on Ray: SAM's automatic mask generator (`engine.amg`) in model actors, one per GPU.

Each actor loads the model once (`engine.model.load_model`) and runs the generator image by image
(`coco_rle` output: masks leave the actor as compressed RLE, never as HxW arrays); turning its
records into SA-1B `MaskRecord`s runs in CPU tasks after the actor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from engine.model_config import model_facts
from sharding.runner import StageResult
from sharding.store import ImageRow
from stages.steps import StageSpec

STAGE = "auto"


def make_auto(model: Any, amg: Any):
    """The per-image function of one actor.

    Arguments:
      model (ModelConfig): the `model:` block. amg (AmgConfig): the `amg:` block.
    Returns:
      (callable): (ImageRow, HxWx3 uint8 RGB) -> list of the generator's records (coco_rle).
    """
    from engine.amg import SamAutomaticMaskGenerator
    from engine.model import load_model

    generator = SamAutomaticMaskGenerator(load_model(model), **dataclasses.asdict(amg))

    def process(row: ImageRow, rgb: np.ndarray) -> list[dict[str, Any]]:
        return generator.generate(rgb)

    return process


def finish_auto(row: ImageRow, records: list[dict[str, Any]]) -> StageResult:
    """The generator's records -> SA-1B masks (final ids are given by the shard runner)."""
    from engine.records import MaskRecord

    return StageResult(masks=[MaskRecord.from_json(r) for r in records])


def auto_spec(model: Any, amg: Any) -> tuple[StageSpec, dict[str, Any]]:
    """The gear-3 stage and the facts its run record keeps (model, checkpoint, settings).

    Arguments:
      model (ModelConfig): `model:` block; a checkpoint path must exist (checked here, before
        any actor starts). amg (AmgConfig): `amg:` block; the output mode is forced to coco_rle.
    """
    check_checkpoint(model)
    amg = dataclasses.replace(amg, output_mode="coco_rle")
    spec = StageSpec(STAGE, make_auto, {"model": model, "amg": amg}, finish=finish_auto)
    meta = {"model": model_facts(model), "amg": dataclasses.asdict(amg)}
    return spec, meta


def check_checkpoint(model: Any) -> None:
    """Raises ValueError, before any actor starts, when the `model:` block names a checkpoint
    that does not exist."""
    if model.checkpoint and not Path(model.checkpoint).expanduser().is_file():
        raise ValueError(
            f"model.checkpoint {model.checkpoint} does not exist: pass a SAM state dict (.pth) "
            "with --checkpoint, on storage every node sees"
        )
