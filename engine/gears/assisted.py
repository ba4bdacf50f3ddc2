"""Gear 1, model-assisted manual annotation, in batch: simulated annotators click reference masks.

Per shard: the images are encoded once into the store (`embeddings.embed_shard`), then for each
image the annotator (`engine.annotator.SimulatedAnnotator`, the SAM paper's protocol) works
through the image's reference objects in order of prominence, each click answered by the decoder
alone from the stored embedding. A mask that reaches the target IoU is accepted and becomes a
`MaskRecord` of the `assisted` stage with its effort (clicks, IoU at acceptance, simulated
seconds, prefilled False); one that does not within the click/time budget is given up, as the
paper's annotators moved on after ~30 s, and counted in the shard's completion record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from engine import rle
from engine.annotator import AnnotatorConfig, MaskTrace, SimulatedAnnotator
from engine.gears import ASSISTED_STAGE
from engine.gears.embeddings import embed_shard, set_image
from engine.mask_ops import box_xyxy_to_xywh, masks_to_boxes_xyxy, stability_score
from engine.predictor import SamPredictor
from engine.records import MaskRecord
from engine.references import ReferenceImage, ReferenceSet
from sharding.runner import RunReport, StageResult, run_stage
from sharding.store import ImageRow, Store


def mask_record(
    mask: np.ndarray,
    low_res_logits: np.ndarray,
    predicted_iou: float,
    points: list[list[float]],
    predictor: SamPredictor,
) -> MaskRecord:
    """An SA-1B `MaskRecord` of one accepted mask (id 0: the shard runner gives the final id).

    Arguments:
      mask (np.ndarray): HxW bool, the image frame.
      low_res_logits (np.ndarray): 1x256x256 logits of that mask (stability is measured on their
        full-resolution upscale, as the automatic generator does).
      points (list[list[float]]): the prompt points [[x, y], ...] (the clicks).
    """
    logits = predictor.model.postprocess_masks(
        torch.as_tensor(low_res_logits, dtype=torch.float32)[None],
        predictor.input_size,
        predictor.original_size,
    )[0, 0]
    stability = float(stability_score(logits, predictor.model.mask_threshold, 1.0))
    box = box_xyxy_to_xywh(masks_to_boxes_xyxy(torch.from_numpy(np.ascontiguousarray(mask))))
    height, width = mask.shape
    return MaskRecord(
        id=0,
        segmentation=rle.encode(mask)[0],
        bbox=[int(v) for v in box.tolist()],
        area=int(np.count_nonzero(mask)),
        predicted_iou=float(predicted_iou),
        stability_score=stability,
        crop_box=[0, 0, int(width), int(height)],
        point_coords=[[float(x), float(y)] for x, y in points],
    )


def trace_record(trace: MaskTrace, predictor: SamPredictor) -> MaskRecord:
    return mask_record(
        trace.mask,
        trace.low_res_logits,
        trace.predicted_iou,
        [[c.x, c.y] for c in trace.clicks],
        predictor,
    )


def trace_effort(trace: MaskTrace, prefilled: bool = False) -> dict[str, Any]:
    return {
        "clicks": trace.n_clicks,
        "iou": float(trace.final_iou),
        "seconds": float(trace.seconds),
        "prefilled": prefilled,
        "annotator": "simulated",
    }


@dataclass
class ShardTally:
    """What a shard's annotation left besides its masks (goes into the completion record)."""

    given_up: int = 0
    given_up_clicks: int = 0
    given_up_seconds: float = 0.0
    without_references: list[int] = field(default_factory=list)
    embedded: dict[str, Any] = field(default_factory=dict)

    def add_given_up(self, trace: MaskTrace) -> None:
        self.given_up += 1
        self.given_up_clicks += trace.n_clicks
        self.given_up_seconds += trace.seconds


class ReferenceDriven:
    """Shared by gears 1 and 2: a store, a predictor, references, the shard's embeddings.

    Subclasses implement `annotate(row, rgb, image)`; `__call__` is the shard runner's per-image
    function (`sharding.runner.ProcessFn`).
    """

    def __init__(
        self,
        store: Store,
        predictor: SamPredictor,
        references: ReferenceSet,
        config: AnnotatorConfig,
    ) -> None:
        self.store = store
        self.predictor = predictor
        self.references = references
        self.config = config
        self.annotator = SimulatedAnnotator(predictor, config)
        self.tally = ShardTally()
        self._embedded_shard: str | None = None

    def __call__(self, row: ImageRow, rgb: np.ndarray) -> StageResult:
        if row.shard != self._embedded_shard:  # first image of a shard: encode the shard once
            self._embedded_shard = row.shard
            self.tally.embedded = asdict(embed_shard(self.store, row.shard, self.predictor))
        image = self.references.match(row.source)
        if image is None:
            self.tally.without_references.append(row.image_id)
            return StageResult()
        if (image.width, image.height) != (rgb.shape[1], rgb.shape[0]):
            raise ValueError(
                f"the references of {image.file_name} in {self.references.path} are "
                f"{image.width}x{image.height} but the image is {rgb.shape[1]}x{rgb.shape[0]} in "
                "the store (EXIF-rotated?): give references in the image's upright frame"
            )
        set_image(self.predictor, self.store, row.shard, row.image_id, rgb)
        return self.annotate(row, rgb, image)

    def annotate(self, row: ImageRow, rgb: np.ndarray, image: ReferenceImage) -> StageResult:
        raise NotImplementedError

    def shard_meta(self) -> dict[str, Any]:
        """The completion record's `meta` for the shard just finished (resets the tally)."""
        tally, self.tally = self.tally, ShardTally()
        self._embedded_shard = None
        return {
            "annotator": "simulated",
            "annotator_config": asdict(self.config),
            "references": self.references.path,
            **asdict(tally),
        }


class AssistedAnnotation(ReferenceDriven):
    """Gear 1: every reference object is annotated from scratch, in order of prominence."""

    def annotate(self, row: ImageRow, rgb: np.ndarray, image: ReferenceImage) -> StageResult:
        result = StageResult()
        for _, trace in self.annotator.annotate_image([r.mask() for r in image.references]):
            if not trace.reached_target:
                self.tally.add_given_up(trace)
                continue
            result.masks.append(trace_record(trace, self.predictor))
            result.effort.append(trace_effort(trace))
        return result


def run_assisted(
    store: Store,
    predictor: SamPredictor,
    references: ReferenceSet,
    config: AnnotatorConfig,
    round_: int = 0,
    shards: list[str] | None = None,
    on_shard: Callable[[str, dict[str, Any]], None] | None = None,
) -> RunReport:
    """Gear 1 over a store's pending shards: output in `stages/assisted/round-<round_>/`.

    round_ is the model round (the model that answers the clicks), so effort per round shows
    how retraining lowers it.
    """
    process = AssistedAnnotation(store, predictor, references, config)
    return run_stage(
        store, ASSISTED_STAGE, round_, process, shards, on_shard=on_shard, meta=process.shard_meta
    )


def embed_store(
    store: Store,
    predictor: SamPredictor,
    shards: list[str] | None = None,
    on_shard: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Encode every shard (or the given ones) into the store ahead of annotation by people."""
    reports = []
    for shard in shards or store.shards():
        report = embed_shard(store, shard, predictor)
        reports.append(report)
        if on_shard is not None:
            on_shard(report)
    return reports
