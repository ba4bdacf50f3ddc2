"""A model-free stand-in stage (Otsu threshold + connected components, `engine.classical`).

It checks a cluster and a store end to end without weights (`sa-engine run classical STORE`) and
is the cheap but real per-image function of the fault-tolerance test.
"""

from __future__ import annotations

import numpy as np

from sharding.runner import StageResult
from sharding.store import ImageRow
from stages.steps import StageSpec

STAGE = "classical"


def make_classical(min_area: int = 100, max_masks: int = 64):
    """The per-image function: (ImageRow, HxWx3 uint8) -> StageResult with the classical masks."""
    from engine.classical import classical_masks

    def process(row: ImageRow, rgb: np.ndarray) -> StageResult:
        return StageResult(masks=classical_masks(rgb, min_area=min_area, max_masks=max_masks))

    return process


def classical_spec(min_area: int = 100, max_masks: int = 64) -> StageSpec:
    return StageSpec(
        STAGE, make_classical, {"min_area": min_area, "max_masks": max_masks}, uses_model=False
    )
