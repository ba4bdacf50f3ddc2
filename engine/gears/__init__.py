"""Gears 1 and 2 of the data engine: model-assisted and semi-automatic annotation.

- `embeddings`: encode a shard's images once and keep the embeddings in the store, so that each
  click costs only the mask decoder.
- `assisted`: gear 1, annotators (simulated, driven by COCO reference masks) click objects in
  order of prominence; every accepted mask keeps its effort (clicks, IoU, seconds).
- `server`: the same gear for people, a web page served from the store (`sa-engine serve`).
- `detector` and `semi`: gear 2, an object box detector on the SAM embedding prefills images,
  annotators add only what is missing.
- `effort`: the per-gear, per-round effort report (table and plot).
"""

from __future__ import annotations

import dataclasses
from typing import Any

ASSISTED_STAGE = "assisted"
SEMI_STAGE = "semi"


def gear_facts(
    model: Any,
    annotate: Any,
    references: str | None = None,
    semi: Any = None,
    detector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a gear-1 or gear-2 run record keeps as its settings, the same for a Ray run and a
    people's session (`serve`): the model with its weights' sha256, the `annotate:` block, the
    references (batch runs), and for gear 2 the `semi:` block and the detector (its file and
    what it was trained on)."""
    from engine.model_config import model_facts

    facts = {"model": model_facts(model), "annotate": dataclasses.asdict(annotate)}
    if references is not None:
        facts["references"] = references
    if semi is not None:
        facts["semi"] = dataclasses.asdict(semi)
        facts["detector"] = detector
    return facts
