"""`AmgConfig`: the `amg:` config block, without torch (a run's driver reads it; only the model
actors import the generator)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AmgConfig:
    """The `amg:` config block: the generator's parameters. Defaults are Meta's library defaults.

    Fields are `SamAutomaticMaskGenerator`'s keyword arguments (see there for their meaning).
    """

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    point_grids: list[list[list[float]]] | None = None
    min_mask_region_area: int = 0
    output_mode: str = "binary_mask"
    max_mask_area_fraction: float | None = None
    decoder_batch: int | None = None
    fast_decoder: bool = False
    iou_prefilter: bool = True
    stability_prefilter: bool | None = None
    batched_masks: bool | None = None

    def kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)
