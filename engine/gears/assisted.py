"""Gear 1, model-assisted manual annotation, in batch: simulated annotators click reference masks.

Per image (in a model actor of the `assisted` Ray pipeline, `stages/assisted.py`): the predictor
is set from the image's stored embedding, or the image is encoded and its new embedding goes back
to the driver to be stored with the shard (`embeddings.keep_embedded`), so every click is answered
by the decoder alone. The annotator (`engine.annotator.SimulatedAnnotator`, the SAM paper's
protocol) then works through the image's reference objects in order of prominence. A mask that
reaches the target IoU is accepted and becomes a `MaskRecord` of the `assisted` stage with its
effort (clicks, IoU at acceptance, simulated seconds, prefilled False); one that does not within
the click/time budget is given up, as the paper's annotators moved on after ~30 s, and counted in
the shard's completion record (`shard_meta`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from engine import rle
from engine.annotator import AnnotatorConfig, MaskTrace, SimulatedAnnotator
from engine.gears.embeddings import EmbeddedImage, EmbedReport, embed_image
from engine.mask_ops import box_xyxy_to_xywh, masks_to_boxes_xyxy, stability_score
from engine.predictor import SamPredictor
from engine.records import MaskRecord
from engine.references import ReferenceImage, ReferenceSet
from sharding.runner import StageResult
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
      points (list[list[float]]): the foreground clicks [[x, y], ...]: SA-1B's `point_coords`
        are the points the mask was prompted to cover, and readers take them as such (a
        background click would read as a point on the object). Background clicks count in the
        mask's effort (`clicks`) but are not kept.
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
        trace.delivered,
        trace.low_res_logits,
        trace.predicted_iou,
        [[c.x, c.y] for c in trace.clicks if c.positive],
        predictor,
    )


def trace_effort(trace: MaskTrace, prefilled: bool = False) -> dict[str, Any]:
    return {
        "clicks": trace.n_clicks,
        "iou": float(trace.final_iou),
        "seconds": float(trace.seconds),
        "prefilled": prefilled,
        "annotator": "simulated",
        "brushed": trace.brushed is not None,
    }


@dataclass
class ImageFacts:
    """What annotating one image leaves besides its masks, for its shard's completion record
    (`StageResult.extra` of the gears' per-image functions).

    embedded: how the image got its embedding (a new one is stored with the shard).
    has_references: False when the references have no image matching it.
    given_up: (clicks, simulated seconds) of each reference given up, in annotation order.
    prefilled, covered_by_prefill: gear 2's prefilled masks and the references they covered.
    """

    embedded: EmbeddedImage
    has_references: bool = True
    given_up: list[tuple[int, float]] = field(default_factory=list)
    prefilled: int = 0
    covered_by_prefill: int = 0


class ReferenceDriven:
    """Shared by gears 1 and 2: a store, a predictor, references; one image at a time.

    Subclasses implement `annotate(row, rgb, image, facts)`; `__call__` is the per-image function
    (`sharding.runner.ProcessFn`) a model actor runs: it sets the predictor to the image (its
    stored embedding, else encoding it), annotates, and returns the masks with their effort and
    the image's `ImageFacts` as `StageResult.extra`.
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

    def __call__(self, row: ImageRow, rgb: np.ndarray) -> StageResult:
        facts = ImageFacts(embed_image(self.predictor, self.store, row.shard, row.image_id, rgb))
        try:  # a failure after encoding still keeps the embedding (`StageResult.failure`)
            image = self.references.match(row.source)
            if image is None:
                facts.has_references = False
                result = StageResult()
            elif (image.width, image.height) != (rgb.shape[1], rgb.shape[0]):
                raise ValueError(
                    f"the references of {image.file_name} in {self.references.path} are "
                    f"{image.width}x{image.height} but the image is {rgb.shape[1]}x{rgb.shape[0]} "
                    "in the store (EXIF-rotated?): give references in the image's upright frame"
                )
            else:
                result = self.annotate(row, rgb, image, facts)
        except Exception as exc:
            return StageResult(extra=facts, failure=exc)
        result.extra = facts
        return result

    def annotate(
        self, row: ImageRow, rgb: np.ndarray, image: ReferenceImage, facts: ImageFacts
    ) -> StageResult:
        raise NotImplementedError

    def click_references(
        self, references: list[np.ndarray], result: StageResult, facts: ImageFacts
    ) -> StageResult:
        """The simulated annotator on `references` (an all-zero mask is skipped): each accepted
        mask and its effort go to `result`, each given-up one to `facts.given_up`."""
        for _, trace in self.annotator.annotate_image(references):
            if not trace.reached_target:
                facts.given_up.append((trace.n_clicks, trace.seconds))
                continue
            result.masks.append(trace_record(trace, self.predictor))
            result.effort.append(trace_effort(trace))
        return result


class AssistedAnnotation(ReferenceDriven):
    """Gear 1: every reference object is annotated from scratch, in order of prominence."""

    def annotate(
        self, row: ImageRow, rgb: np.ndarray, image: ReferenceImage, facts: ImageFacts
    ) -> StageResult:
        return self.click_references([r.mask() for r in image.references], StageResult(), facts)


def shard_meta(
    config: AnnotatorConfig,
    references: str,
    images: Iterable[tuple[int, ImageFacts | None]],
    embedded: EmbedReport,
) -> dict[str, Any]:
    """A gear shard's completion record `meta` from its images' facts.

    Arguments:
      config (AnnotatorConfig): the simulated annotator's settings. references (str): their file.
      images: (image_id, ImageFacts) in image_id order; None for an image quarantined before it
        reached the annotator.
      embedded (EmbedReport): what `keep_embedded` stored for the shard.
    Returns:
      (dict): annotator, annotator_config, references, given_up (count), given_up_clicks,
        given_up_seconds, without_references (image ids), embedded.
    """
    given_up = given_up_clicks = 0
    given_up_seconds = 0.0
    without_references = []
    for image_id, facts in images:
        if facts is None:
            continue
        if not facts.has_references:
            without_references.append(image_id)
        for clicks, seconds in facts.given_up:
            given_up += 1
            given_up_clicks += clicks
            given_up_seconds += seconds
    return {
        "annotator": "simulated",
        "annotator_config": asdict(config),
        "references": references,
        "given_up": given_up,
        "given_up_clicks": given_up_clicks,
        "given_up_seconds": given_up_seconds,
        "without_references": without_references,
        "embedded": asdict(embedded),
    }
