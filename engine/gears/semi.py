"""Gear 2, semi-automatic annotation: images arrive prefilled, annotators add what is missing.

1. The object detector (`engine.gears.detector`) is trained on the store's gear-1 masks (their
   boxes, on the stored embeddings) and saved as `STORE/detectors/semi-round-<k>.pt`
   (`load_or_train`: once, on the Ray driver, before the pipeline of `stages/semi.py`).
2. Per image (`SemiAnnotation`, in each model actor, which loads that detector file) its
   confident boxes become masks through SAM box prompts: the prefilled masks
   (effort: 0 clicks, 0 s, prefilled True, annotator "detector"; `iou` is the best IoU with a
   reference, for analysis).
3. The simulated annotator then annotates, in order of prominence, only the references that no
   prefilled mask covers at the target IoU; those are the added masks (prefilled False).

Output: `stages/semi/round-<k>/`, the same tables as gear 1, so the effort report shows prefilled
vs added per round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from engine.annotator import AnnotatorConfig, mask_iou
from engine.gears import ASSISTED_STAGE
from engine.gears.assisted import (
    ImageFacts,
    ReferenceDriven,
    mask_record,
    shard_meta,
)
from engine.gears.detector import DetectorConfig, TrainedDetector, detect, train_detector
from engine.gears.embeddings import EmbedReport, embed_shard
from engine.predictor import ImageEmbedding, SamPredictor, encoder_fingerprint
from engine.references import ReferenceImage, ReferenceSet
from sharding.runner import StageResult
from sharding.store import ImageRow, Store


@dataclass
class SemiConfig(DetectorConfig):
    """The `semi:` block: the detector (see `DetectorConfig`) and the prefill filter.

    min_predicted_iou: a box's SAM mask is prefilled only if SAM's predicted IoU reaches this.
    """

    min_predicted_iou: float = 0.5


def detector_path(store: Store, round_: int) -> Path:
    return store.root / "detectors" / f"semi-round-{round_}.pt"


def round_detector(store: Store, round_: int, path: Path | None = None) -> Path:
    """The detector file a gear-2 command uses (`load_or_train` loads, or trains and saves, it):
    `path` if given, else the store's for the round; absolute, as run records keep it."""
    return (path or detector_path(store, round_)).resolve()


def training_samples(
    store: Store, predictor: SamPredictor, min_box: float, stage: str = ASSISTED_STAGE
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """(embedding, boxes in the 1024 px input frame) per image with gear-1 masks.

    Each shard contributes its latest finished gear-1 round (the newest masks, as the paper
    retrained on the newest gear's data); images are encoded into the store if they are not yet.
    """
    fingerprint = encoder_fingerprint(predictor.model)
    rounds = store.rounds(stage)[::-1]
    samples, used = [], {}
    for shard in store.shards():
        round_ = next((r for r in rounds if store.done_record(stage, r, shard) is not None), None)
        if round_ is None:
            continue
        boxes: dict[int, list[list[float]]] = {}
        table = store.read_annotations(stage, round_, shard)
        for image_id, (x, y, w, h) in zip(
            table.column("image_id").to_pylist(), table.column("bbox").to_pylist()
        ):
            if w >= min_box and h >= min_box:
                boxes.setdefault(image_id, []).append([x, y, x + w, y + h])
        if not boxes:
            continue
        embed_shard(store, shard, predictor)
        used[shard] = round_
        for image_id, image_boxes in sorted(boxes.items()):
            data = store.read_embedding(fingerprint, shard, image_id)
            if data is None:
                continue  # unreadable image: it has no embedding (and no masks) to learn from
            state = ImageEmbedding.from_bytes(data)
            scale = max(state.input_size) / max(state.original_size)
            samples.append((state.features, torch.tensor(image_boxes) * scale))
    return samples, {"stage": stage, "rounds": used}


def load_or_train(
    store: Store,
    predictor: SamPredictor,
    config: SemiConfig,
    round_: int,
    path: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainedDetector:
    """The round's detector: `path` if given, else the stored one for this round and encoder,
    else trained now on the gear-1 masks and saved to `detector_path(store, round_)`."""
    fingerprint = encoder_fingerprint(predictor.model)
    stored = round_detector(store, round_, path)
    if stored.is_file():
        detector = TrainedDetector.load(stored)
        if detector.encoder_fingerprint != fingerprint:
            if path is not None:
                raise ValueError(
                    f"detector {path} was trained on embeddings of another image encoder "
                    f"({detector.encoder_fingerprint}, this model: {fingerprint}): retrain it"
                )
        else:
            detector.config = config  # thresholds of this run; the weights are the trained ones
            return detector
    elif path is not None:
        raise ValueError(f"detector {path} does not exist")
    samples, info = training_samples(store, predictor, config.min_box)
    detector, losses = train_detector(samples, config, fingerprint, info)
    info = detector.trained_on
    detector.save(detector_path(store, round_))
    if log is not None:
        log(
            f"detector trained on {info['images']} images / {info['boxes']} gear-1 boxes in "
            f"{config.steps} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}); saved to "
            f"{detector_path(store, round_)}"
        )
    return detector


def prefill(
    detector: TrainedDetector, predictor: SamPredictor, semi: SemiConfig
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """The prefilled masks of the image set in `predictor`: (HxW bool mask, 1x256x256 logits,
    SAM's predicted IoU) for each confident detector box whose box-prompt mask passes the filter."""
    p = predictor
    boxes, _ = detect(detector, p.features, p.input_size)
    scale = max(p.input_size) / max(p.original_size)
    out = []
    for box in (boxes / scale).numpy():
        if min(box[2] - box[0], box[3] - box[1]) < semi.min_box:
            continue
        masks, ious, low_res = p.predict(box=box, multimask_output=False)
        if float(ious[0]) >= semi.min_predicted_iou and masks[0].any():
            out.append((masks[0], low_res[0][None], float(ious[0])))
    return out


def prefilled_effort(iou: float | None = None) -> dict[str, Any]:
    return {"clicks": 0, "iou": iou, "seconds": 0.0, "prefilled": True, "annotator": "detector"}


class SemiAnnotation(ReferenceDriven):
    """Gear 2 per image: prefill from detector boxes, then add the references still missing."""

    def __init__(
        self,
        store: Store,
        predictor: SamPredictor,
        references: ReferenceSet,
        config: AnnotatorConfig,
        detector: TrainedDetector,
        semi: SemiConfig,
    ) -> None:
        super().__init__(store, predictor, references, config)
        self.detector, self.semi = detector, semi

    def annotate(
        self, row: ImageRow, rgb: np.ndarray, image: ReferenceImage, facts: ImageFacts
    ) -> StageResult:
        p = self.predictor
        references = [r.mask() for r in image.references]
        result = StageResult()
        prefilled = []
        for mask, logits, score in prefill(self.detector, p, self.semi):
            prefilled.append(mask)
            best = max((mask_iou(mask, r) for r in references), default=None)
            result.masks.append(mask_record(mask, logits, score, [], p))
            result.effort.append(prefilled_effort(best))
        target = self.config.target_iou
        covered = [any(mask_iou(m, r) >= target for m in prefilled) for r in references]
        facts.covered_by_prefill = sum(covered)
        facts.prefilled = len(prefilled)
        missing = [np.zeros_like(r) if c else r for r, c in zip(references, covered)]
        return self.click_references(missing, result, facts)


def semi_meta(
    config: AnnotatorConfig,
    references: str,
    images: Iterable[tuple[int, ImageFacts | None]],
    embedded: EmbedReport,
    detector: dict[str, Any],
    semi: SemiConfig,
) -> dict[str, Any]:
    """A gear-2 shard's completion record `meta`: gear 1's (`assisted.shard_meta`) plus the
    prefilled masks, the references they covered, the detector's training facts (`trained_on`)
    and the `semi:` settings."""
    images = list(images)
    meta = shard_meta(config, references, images, embedded)
    meta.update(
        prefilled=sum(f.prefilled for _, f in images if f is not None),
        covered_by_prefill=sum(f.covered_by_prefill for _, f in images if f is not None),
        detector=detector,
        semi_config=asdict(semi),
    )
    return meta
