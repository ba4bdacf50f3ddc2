"""The gate: measure a model with the simulated annotator on held-out masks, and compare two rounds.

Figures per model (the usual interactive-segmentation ones, SAM paper section 7.1):
  - `miou_1click`: mean IoU after the first click,
  - `miou_5clicks`: mean IoU after 5 clicks,
  - `clicks_to_target`: mean clicks to reach IoU `target_iou` (0.9), a mask that never gets there
    counting `max_clicks` (NoC@90), and `reached_share`, the share of masks that got there.
A candidate is promoted only when it improves the primary figure by at least `min_gain` and no
figure gets worse by more than `tolerance`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from engine.annotator import CHOICES
from engine.checks import invalid
from engine.modeling import Sam
from engine.training.trainer import TrainItem, left_out_reason

_HIGHER_IS_BETTER = {"miou_1click": True, "miou_5clicks": True, "clicks_to_target": False}


@dataclass
class GateConfig:
    """The `gate:` part of the `train:` block.

    Attributes:
      target_iou (float): IoU a mask must reach (0.9).
      max_clicks (int): click budget per mask (>= 5; NoC counts it for masks never reaching target).
      primary (str): the figure that must improve: clicks_to_target, miou_1click or miou_5clicks.
      min_gain (float): least improvement of the primary figure (clicks or IoU units).
      tolerance (float): largest regression allowed on the other figures.
      max_masks (int): evaluate on at most this many held-out masks (0: all).
      min_mask_area (int): masks smaller than this many pixels are left out (a click can't land).
      first_choice (str): which of the first click's 3 masks is kept: "oracle" (closest to the
        reference, as gear 1's annotator picks) or "predicted" (highest predicted IoU).
    """

    target_iou: float = 0.9
    max_clicks: int = 20
    primary: str = "clicks_to_target"
    min_gain: float = 0.0
    tolerance: float = 0.01
    max_masks: int = 0
    min_mask_area: int = 100
    first_choice: str = "oracle"

    def validate(self) -> None:
        if self.primary not in _HIGHER_IS_BETTER:
            raise invalid("train.gate.primary", self.primary, f"one of {', '.join(_HIGHER_IS_BETTER)}")
        if self.max_clicks < 5:
            raise invalid(
                "train.gate.max_clicks", self.max_clicks,
                "a whole number >= 5 (mIoU at 5 clicks)",
            )  # fmt: skip
        if not 0 < self.target_iou <= 1:
            raise invalid("train.gate.target_iou", self.target_iou, "an IoU in (0, 1]")
        if self.max_masks < 0:
            raise invalid("train.gate.max_masks", self.max_masks, "a whole number >= 0 (0: all)")
        if self.min_mask_area < 0:
            raise invalid("train.gate.min_mask_area", self.min_mask_area, "a whole number of pixels >= 0")
        if self.first_choice not in CHOICES:
            raise invalid("train.gate.first_choice", self.first_choice, f"one of {', '.join(CHOICES)}")
        if self.min_gain < 0 or self.tolerance < 0:
            name = "min_gain" if self.min_gain < 0 else "tolerance"
            raise invalid(f"train.gate.{name}", getattr(self, name), "a value >= 0")


@dataclass
class ModelScore:
    """Figures of one model on the held-out masks (see module docstring)."""

    miou_1click: float
    miou_5clicks: float
    clicks_to_target: float
    reached_share: float
    masks: int
    images: int
    seconds: float
    per_click_miou: list[float] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # images left out: id, reason, detail

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def click_trace(predictor, reference: np.ndarray, config: GateConfig) -> list[float]:
    """IoU after each click of the simulated annotator on one mask (image already set).

    Uses `engine.annotator.SimulatedAnnotator` (the protocol shared with gear 1): first click at
    the interior point farthest from the boundary, next clicks in the largest error region,
    previous low-res logits fed back. It stops at the target IoU (later clicks keep that IoU).
    """
    from engine.annotator import AnnotatorConfig, SimulatedAnnotator

    annotator = SimulatedAnnotator(
        predictor,
        AnnotatorConfig(
            target_iou=config.target_iou,
            max_clicks=config.max_clicks,
            seconds_per_click=1.0,
            time_limit_s=float(config.max_clicks),
            first_choice=config.first_choice,
        ),
    )
    return list(annotator.annotate(reference).ious)


def score_model(
    sam: Sam,
    items: Sequence[TrainItem],
    config: GateConfig,
    log: Callable[[str], None] = print,
    trace: Callable[..., list[float]] | None = None,
) -> ModelScore:
    """Run the simulated annotator of `trace` (default `click_trace`) on every held-out mask."""
    from engine.predictor import SamPredictor

    config.validate()
    trace = trace or click_trace
    predictor = SamPredictor(sam)
    traces: list[list[float]] = []
    images = 0
    skipped = []
    start = time.perf_counter()
    for item in items:
        if config.max_masks and len(traces) >= config.max_masks:
            break
        try:
            image, masks = item.load()
        except (OSError, ValueError) as exc:
            log(f"skip {item.image_id}: {exc}")
            reason = left_out_reason(exc)
            skipped.append({"image": item.image_id, "reason": reason, "detail": str(exc)})
            continue
        masks = [m for m in masks if m.sum() >= config.min_mask_area]
        if not masks:
            continue
        predictor.set_image(image)
        images += 1
        for mask in masks:
            if config.max_masks and len(traces) >= config.max_masks:
                break
            traces.append(trace(predictor, mask, config))
    if not traces:
        raise ValueError("no held-out masks to evaluate on: add images or lower train.gate.min_mask_area")
    score = _summarise(traces, images, time.perf_counter() - start, config)
    score.skipped = skipped
    return score


def _summarise(traces: list[list[float]], images: int, seconds: float, config: GateConfig) -> ModelScore:
    from engine.annotator import clicks_to_reach

    budget = config.max_clicks
    padded = np.array([t + [t[-1]] * (budget - len(t)) for t in traces])  # stopped masks keep IoU
    # A mask never reaching the target counts budget + 1 clicks (penalised NoC, as gear 1 counts).
    clicks = [clicks_to_reach(t, config.target_iou, budget) for t in traces]
    reached = [c <= budget for c in clicks]
    return ModelScore(
        miou_1click=float(padded[:, 0].mean()),
        miou_5clicks=float(padded[:, 4].mean()),
        clicks_to_target=float(np.mean(clicks)),
        reached_share=float(np.mean(reached)),
        masks=len(traces),
        images=images,
        seconds=round(seconds, 1),
        per_click_miou=[round(float(v), 4) for v in padded.mean(0)],
    )


@dataclass
class GateDecision:
    promote: bool
    reason: str
    deltas: dict[str, float]


def decide(candidate: ModelScore, current: ModelScore | None, config: GateConfig) -> GateDecision:
    """Promote when the primary figure improves by >= min_gain and nothing regresses > tolerance."""
    if current is None:
        return GateDecision(True, "no current model to compare with", {})
    deltas, worse = {}, []
    for name, higher in _HIGHER_IS_BETTER.items():
        gain = getattr(candidate, name) - getattr(current, name)
        gain = gain if higher else -gain  # positive = better
        deltas[name] = round(gain, 4)
        if name != config.primary and gain < -config.tolerance:
            worse.append(f"{name} worse by {-gain:.3f}")
    primary_gain = deltas[config.primary]
    if worse:
        return GateDecision(False, "; ".join(worse), deltas)
    if primary_gain == 0 and config.min_gain == 0:
        # a tie on the primary figure (e.g. neither model reaches the target IoU within the
        # click budget) is decided by the other figures: one must improve beyond the tolerance
        better = [n for n, g in deltas.items() if n != config.primary and g > config.tolerance]
        if better:
            return GateDecision(
                True, f"{config.primary} tied; {', '.join(better)} better", deltas
            )
    if primary_gain <= config.min_gain and not (config.min_gain == 0 and primary_gain > 0):
        return GateDecision(
            False, f"{config.primary} did not improve (gain {primary_gain:.3f} <= {config.min_gain})", deltas
        )
    return GateDecision(True, f"{config.primary} better by {primary_gain:.3f}", deltas)


def gate_held_out_share(
    registry: Any,
    rounds: list[int],
    given: float | None,
    default: float,
    sources: list[str] | None = None,
) -> float:
    """The held-out share the gate scores `rounds` (of a `ModelRegistry`) at on images of the
    `sources` kinds ("store", "coco", "synthetic"; None: any): `given`, else the smallest that
    they and the rounds they were fine-tuned from were trained with on those kinds (their cards'
    `data` and `lineage`), else `default`. Raises ValueError for a share larger than one they
    were trained with: the images in between were training images of a scored round."""
    from engine.training.data import trained_held_out_share

    cards, seen, todo = [], set(), list(rounds)
    while todo:  # each round, and the rounds it was fine-tuned from
        round_ = todo.pop()
        if round_ in seen:
            continue
        seen.add(round_)
        card = registry.card(round_)
        cards.append(card)
        parent = card.get("parent_round")
        if isinstance(parent, int) and parent >= 0:
            todo.append(parent)
    trained = trained_held_out_share(cards, sources)
    share = given if given is not None else trained if trained is not None else default
    if trained is not None and share > trained + 1e-12:
        raise ValueError(
            f"held-out share {share:g} is larger than a scored round (or one it was fine-tuned "
            f"from) was trained with ({trained:g}): images in between were training images; use "
            f"--held-out-share {trained:g} or less (the default reads it from the cards), or "
            "--split all with a separate test set"
        )
    return share
