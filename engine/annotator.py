"""The simulated annotator: clicks like the SAM paper's interactive protocol, driven by reference masks.

Gears 1 and 2 are done by people in batch runs they are done by this annotator, and the gate that
promotes a retrained model (`evaluate`) measures effort with it, so the two agree on what a click is:

- objects are annotated in order of prominence (largest reference mask first);
- the first click is positive, at the reference's interior point farthest from its boundary;
- each next click goes to the largest error region: positive in a missed (false-negative) region,
  negative in a spilled (false-positive) one, at that region's point farthest from its boundary;
- the previous click's low-res logits are fed back as the mask prompt;
- the annotator stops at the target IoU, at the click budget, or when the per-mask time limit runs
  out (clicks x seconds per click, as the paper's annotators moved on after ~30 s);
- a mask that reached the target is finished with the brush and eraser (`refine: brush`), as the
  paper's annotators refined SAM's masks pixel-precisely: the delivered mask is the reference, the
  effort figures stay those of the clicks. `refine: none` delivers SAM's mask as it is.

Nothing here knows about models beyond the predictor interface (`predict(point_coords,
point_labels, mask_input, multimask_output)` on an image whose embedding is set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.checks import invalid

CHOICES = ("oracle", "predicted")
REFINES = ("brush", "none")


class PointPredictor(Protocol):
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class AnnotatorConfig:
    """How the simulated annotator works (the `annotate:` config block).

    target_iou: accept the mask once its IoU with the reference reaches this.
    max_clicks: click budget per mask.
    seconds_per_click: simulated time a click costs (paper: 34 s -> 14 s per mask over gear 1).
    time_limit_s: per-mask time limit; with seconds_per_click it caps the clicks too.
    first_choice: which of the first click's three masks the annotator keeps: "oracle" (the one
      closest to the reference, as a person looking at them picks) or "predicted" (highest
      predicted IoU, what the model alone would choose).
    refine: what the annotator delivers once a mask reached the target: "brush" (the mask finished
      pixel-precisely with brush and eraser, i.e. the reference, as in the paper's gear 1, so a
      retrain learns from exact masks) or "none" (SAM's mask after the last click).
    """

    target_iou: float = 0.9
    max_clicks: int = 20
    seconds_per_click: float = 1.5
    time_limit_s: float = 30.0
    first_choice: str = "oracle"
    stop_at_target: bool = True
    refine: str = "brush"

    def __post_init__(self) -> None:
        if not 0.0 < self.target_iou <= 1.0:
            raise invalid("annotate.target_iou", self.target_iou, "an IoU in (0, 1]")
        if self.max_clicks < 1:
            raise invalid("annotate.max_clicks", self.max_clicks, "a whole number >= 1")
        for name in ("seconds_per_click", "time_limit_s"):
            if not getattr(self, name) > 0:
                raise invalid(f"annotate.{name}", getattr(self, name), "seconds > 0")
        if self.first_choice not in CHOICES:
            raise invalid(
                "annotate.first_choice", self.first_choice,
                f"one of {', '.join(CHOICES)}",
            )  # fmt: skip
        if self.refine not in REFINES:
            raise invalid("annotate.refine", self.refine, f"one of {', '.join(REFINES)}")

    @property
    def click_budget(self) -> int:
        """Clicks allowed per mask: the budget, or fewer when the time limit comes first."""
        by_time = int(self.time_limit_s // self.seconds_per_click + 1e-9)
        return max(1, min(self.max_clicks, by_time))


@dataclass
class Click:
    """One click in image pixels; positive (label 1) adds, negative (label 0) removes."""

    x: float
    y: float
    positive: bool

    @property
    def label(self) -> int:
        return int(self.positive)


@dataclass
class MaskTrace:
    """Everything one simulated annotation produced: the effort figures and the accepted mask.

    ious[i] is the IoU with the reference after click i + 1, so ious[0] is the 1-click IoU.
    seconds: simulated time until the mask was accepted (clicks up to the first that reached the
    target, or all of them) x seconds per click.
    brushed: the mask finished with brush and eraser (`refine: brush`, only once the target was
    reached); None when SAM's mask is delivered as it is.
    """

    clicks: list[Click]
    ious: list[float]
    mask: np.ndarray  # HxW bool, the mask after the last click
    low_res_logits: np.ndarray  # 1x256x256, the last click's logits
    predicted_iou: float
    reached_target: bool
    seconds: float
    reference_area: int = 0
    brushed: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_clicks(self) -> int:
        return len(self.clicks)

    @property
    def final_iou(self) -> float:
        return self.ious[-1]

    @property
    def delivered(self) -> np.ndarray:
        """The mask the annotator hands in: brushed when refined, else SAM's last mask."""
        return self.mask if self.brushed is None else self.brushed


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two HxW bool masks (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b)) / float(union)


def farthest_interior_point(region: np.ndarray) -> tuple[int, int, float]:
    """(x, y, distance) of the pixel of `region` farthest from its boundary (the image edge counts
    as boundary). Ties go to the first pixel in row-major order, so clicks are deterministic."""
    import cv2

    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    flat = int(np.argmax(dist))
    y, x = divmod(flat, region.shape[1])
    return x, y, float(dist[y, x])


def first_click(reference: np.ndarray) -> Click:
    if not reference.any():
        raise ValueError("the reference mask is empty: there is nothing to click on")
    x, y, _ = farthest_interior_point(reference)
    return Click(float(x), float(y), True)


def next_click(reference: np.ndarray, prediction: np.ndarray) -> Click | None:
    """The click that fixes the largest error region, or None when the masks are equal.

    The largest connected region of misses (reference & ~prediction) or spills
    (prediction & ~reference) is clicked at its point farthest from its boundary: positive for a
    miss, negative for a spill. Ties in area prefer the miss.
    """
    import cv2

    best: tuple[int, int, np.ndarray, bool] | None = None
    for positive, error in ((True, reference & ~prediction), (False, prediction & ~reference)):
        if not error.any():
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(
            error.astype(np.uint8), connectivity=8
        )
        label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[label, cv2.CC_STAT_AREA])
        if best is None or area > best[0]:
            best = (area, label, labels, positive)
    if best is None:
        return None
    _, label, labels, positive = best
    x, y, _ = farthest_interior_point(labels == label)
    return Click(float(x), float(y), positive)


class SimulatedAnnotator:
    """Annotates reference masks on the image currently set in `predictor`.

    Arguments:
      predictor (PointPredictor): e.g. `engine.predictor.SamPredictor` after `set_image` (or
        `set_image_state` with a stored embedding: only the decoder runs per click).
      config (AnnotatorConfig): target IoU, budgets, how the first mask is chosen.
    """

    def __init__(self, predictor: PointPredictor, config: AnnotatorConfig | None = None) -> None:
        self.predictor = predictor
        self.config = config or AnnotatorConfig()

    def annotate(self, reference: np.ndarray) -> MaskTrace:
        """Click until the mask matches `reference` (HxW bool, the image's frame) well enough."""
        reference = np.asarray(reference, dtype=bool)
        if reference.ndim != 2:
            raise ValueError(f"a reference mask must be HxW, got shape {reference.shape}")
        cfg = self.config
        clicks = [first_click(reference)]
        ious: list[float] = []
        logits = None
        mask = np.zeros_like(reference)
        score = 0.0
        while True:
            coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float64)
            labels = np.array([c.label for c in clicks], dtype=np.int64)
            first = len(clicks) == 1
            masks, scores, low_res = self.predictor.predict(
                point_coords=coords,
                point_labels=labels,
                mask_input=logits,
                multimask_output=first,
            )
            if masks.shape[-2:] != reference.shape:
                raise ValueError(
                    f"the predictor's masks are {masks.shape[-2:]}, the reference is "
                    f"{reference.shape}: set the image the reference belongs to"
                )
            pick = self._pick(masks, scores, reference) if first else 0
            mask, score, logits = masks[pick], float(scores[pick]), low_res[pick][None]
            ious.append(mask_iou(mask, reference))
            done = cfg.stop_at_target and ious[-1] >= cfg.target_iou
            if done or len(clicks) >= cfg.click_budget:
                break
            click = next_click(reference, mask)
            if click is None:
                break
            clicks.append(click)
        reached = max(ious) >= cfg.target_iou
        return MaskTrace(
            clicks=clicks,
            ious=ious,
            mask=mask,
            low_res_logits=logits,
            predicted_iou=score,
            reached_target=reached,
            seconds=min(clicks_to_reach(ious, cfg.target_iou, len(ious)), len(ious))
            * cfg.seconds_per_click,
            reference_area=int(np.count_nonzero(reference)),
            brushed=reference.copy() if reached and cfg.refine == "brush" else None,
        )

    def annotate_image(self, references: list[np.ndarray]) -> list[tuple[int, MaskTrace]]:
        """Annotate every reference of one image in order of prominence (largest first).

        Returns:
          (list[tuple[int, MaskTrace]]): (index into `references`, trace), in annotation order.
          Empty references are skipped (there is nothing a person could click).
        """
        areas = [int(np.count_nonzero(r)) for r in references]
        order = sorted((i for i, a in enumerate(areas) if a > 0), key=lambda i: (-areas[i], i))
        return [(i, self.annotate(references[i])) for i in order]

    def _pick(self, masks: np.ndarray, scores: np.ndarray, reference: np.ndarray) -> int:
        if self.config.first_choice == "predicted":
            return int(np.argmax(scores))
        return int(np.argmax([mask_iou(m, reference) for m in masks]))


def clicks_to_reach(ious: list[float], target: float, budget: int) -> int:
    """Clicks needed until IoU >= target; `budget + 1` when never reached (a penalised count, as
    in interactive-segmentation benchmarks' NoC metric)."""
    for i, iou in enumerate(ious):
        if iou >= target:
            return i + 1
    return budget + 1
