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

    def __post_init__(self) -> None:
        check_generator_params(**self.kwargs())  # on the driver, before any model actor starts

    def kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def check_generator_params(
    points_per_side: int | None = 32,
    points_per_batch: int = 64,
    crop_n_layers: int = 0,
    crop_n_points_downscale_factor: int = 1,
    point_grids: list | None = None,
    output_mode: str = "binary_mask",
    max_mask_area_fraction: float | None = None,
    decoder_batch: int | None = None,
    **_: Any,
) -> None:
    """Raises ValueError naming a generator parameter that cannot work (the others take any value
    Meta's generator takes). `SamAutomaticMaskGenerator` and `AmgConfig` both check with it."""
    if (points_per_side is None) == (point_grids is None):
        raise ValueError("give exactly one of points_per_side and point_grids")
    if int(crop_n_layers) < 0:
        raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
    if points_per_side is not None:
        if int(points_per_side) < 1:
            raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
        if int(crop_n_points_downscale_factor) < 1:
            raise ValueError("crop_n_points_downscale_factor must be >= 1")
        last = int(int(points_per_side) / int(crop_n_points_downscale_factor) ** int(crop_n_layers))
        if last < 1:
            raise ValueError(
                f"points_per_side={points_per_side} leaves no points on crop layer "
                f"{crop_n_layers} with downscale {crop_n_points_downscale_factor}: raise "
                "points_per_side or lower crop_n_layers / crop_n_points_downscale_factor"
            )
    elif len(point_grids) != int(crop_n_layers) + 1:
        raise ValueError(
            f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs "
            f"{int(crop_n_layers) + 1} (one per layer)"
        )
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
    if int(points_per_batch) < 1 or (decoder_batch is not None and int(decoder_batch) < 1):
        raise ValueError("points_per_batch and decoder_batch must be >= 1 (decoder_batch: or None)")
    if max_mask_area_fraction is not None and not 0 < max_mask_area_fraction <= 1:
        raise ValueError(
            f"max_mask_area_fraction must be in (0, 1] or None, got {max_mask_area_fraction}"
        )
