"""The automatic mask generator (gear 3): a grid of point prompts over the image and its crops,
quality filters, NMS, optional small-region cleanup, SA-1B records.

`SamAutomaticMaskGenerator(model, **params)` takes Meta's parameter names and gives Meta's output
(same masks, same order, same scores) for the same parameters, plus the paper's filter that Meta's
code lacks (`max_mask_area_fraction`: drop masks covering >= that fraction of the image). Library
defaults are Meta's; `configs/sa1b.yaml` holds the paper's settings.

What makes it fast and bounded in memory without changing the output:
- with a predicted-IoU threshold, the prompts that cannot pass it are found first with the
  IoU-only pass of `engine.modeling.iou_only` (a fifth of the work or less); with a stability
  threshold, that pass also gives rough masks, and the prompts none of whose masks can pass the
  stability or crop-edge filter are found from them with a bound on their difference from
  Meta's arithmetic (`stability_prefilter`); Meta's arithmetic runs only for the others;
- only low-resolution logits leave the decoder; each candidate is upsampled one at a time, and
  only on the window where its logits can pass the lowest threshold applied
  (`engine.mask_ops.MaskUpsampler.window`, bit-identical to `Sam.postprocess_masks` there);
- the predicted-IoU filter runs before any upsampling, the stability filter before binarising;
- candidates are kept as full-image column-major run lengths (COCO's layout), never as HxW arrays;
- small-region cleanup works on each mask's box (`engine.amg_regions`).
- the decoder's large temporaries reuse freed heap memory instead of fresh pages
  (`engine.heap`, set when the predictor is made).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from engine.amg_config import AmgConfig, check_generator_params
from engine.amg_crops import (
    build_all_layer_point_grids,
    generate_crop_boxes,
    near_crop_edge,
    surely_near_crop_edge,
)
from engine.amg_masks import (
    mask_boxes,
    masks_to_runs,
    runs_area,
    runs_to_mask,
    runs_to_window,
    tight_box,
    window_to_runs,
)
from engine.amg_nms import nms
from engine.amg_regions import clean_mask, clean_window
from engine.mask_ops import MaskUpsampler
from engine.modeling import batch_rows, iou_only
from engine.predictor import SamPredictor

if TYPE_CHECKING:
    from engine.records import ImageRecord, MaskRecord

# How far under pred_iou_thresh a prompt's re-associated IoU may be and still get Meta's
# arithmetic: the two differ by ~5e-6 (fixture sets A and B), so this is ~2000x that.
PREFILTER_MARGIN = 1e-2
# The prefilter's pass cost about a quarter of the exact one's IoUs (CPU, fixture model) when
# this was set, so it paid while fewer than about three quarters of the prompts passed; on
# factored tokens it costs ~5.5 against ~36 ms a prompt, so 0.7 is on the safe side.
PREFILTER_MAX_PASSING = 0.7
# The stability prefilter's bound on how far the rough masks' low-res logits may be from Meta's,
# as a fraction of 1 + the batch's largest |logit|: they differ by up to ~2e-6 of it (fixture
# crops), so this is ~500x that. Each batch checks the prompts it decoded both ways:
# a difference over STABILITY_CHECK of the margin turns the prefilter off (and decodes what it
# dropped).
STABILITY_MARGIN = 1e-3
STABILITY_CHECK = 0.1
# The stability prefilter's rough masks cost about a fifth of Meta's arithmetic for a prompt (CPU,
# fixture model: ~7 against ~35 ms, on top of the IoU pass): it pays while fewer than about four
# in five of the prompts it upscales have a mask that may pass, and with no IoU pass to share
# (no IoU threshold, or most prompts passing it), fewer than about two in three. A batch skips it
# when more than this share of the prompts near or over the IoU threshold in the crop's batches
# so far had a mask that may pass (in a batch without the bound: that kept a mask, which may
# pass); counted over the crop, as one batch's few prompts near the threshold say little.
STABILITY_PREFILTER_MAX_PASSING = 0.6


@dataclass
class _Candidates:
    """Masks that passed the per-batch filters; boxes are inclusive XYXY in the image frame."""

    runs: list[np.ndarray] = field(default_factory=list)
    boxes: list[list[int]] = field(default_factory=list)
    iou_preds: list[float] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    crop_boxes: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.runs)

    def extend(self, other: "_Candidates") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def select(self, keep: torch.Tensor | np.ndarray | list[int]) -> "_Candidates":
        index = [int(i) for i in keep]
        return _Candidates(
            **{name: [getattr(self, name)[i] for i in index] for name in self.__dataclass_fields__}
        )


@dataclass
class _MaskBound:
    """The stability prefilter's pass over a batch: which prompts may pass, the margin `delta`
    its decision allowed for, the rough IoUs, and the rough low-res logits of the prompts that
    may pass (in order), to check against Meta's once those are decoded."""

    logits: torch.Tensor
    ious: torch.Tensor
    may_pass: torch.Tensor
    delta: float
    iou_filter: bool
    low_res_needed: tuple[int, int] | None  # the part of the logits the generator reads

    def holds(self, exact_logits: torch.Tensor, exact_ious: torch.Tensor) -> bool:
        """Whether the prompts that may pass, decoded exactly (their logits and IoUs, in order),
        are within STABILITY_CHECK of the margins (exact logits are computed where an IoU passes
        the filter: compared there)."""
        if not len(exact_logits):
            return True
        computed = exact_logits.flatten(1).abs().amax(1) > 0
        approx, exact = self.logits.to(exact_logits.device)[computed], exact_logits[computed]
        if self.low_res_needed is not None:
            height, width = self.low_res_needed
            approx, exact = approx[..., :height, :width], exact[..., :height, :width]
        logits_ok = not len(approx) or float((approx - exact).abs().max()) <= STABILITY_CHECK * self.delta
        rows = self.may_pass.nonzero()[:, 0].to(exact_ious.device)
        ious_ok = not self.iou_filter or float(
            (self.ious[rows] - exact_ious).abs().max()
        ) <= STABILITY_CHECK * PREFILTER_MARGIN
        return logits_ok and ious_ok


@dataclass
class _Batch:
    """One `points_per_batch` batch of a crop, from its screening to its masks.

    points: B x 2 point prompts (crop frame); coords: B x 1 x 2 (the model's input frame,
    float64 as Meta's). ious: B x 3 predicted IoUs (rough ones, to ~1e-6, until the rows' exact
    ones are decoded). rows: the prompts decoded in Meta's arithmetic (ascending); logits: their
    len(rows) x 3 low-res logits (0 until decoded; only where an IoU passes the filter); decoded:
    how many of them are. meta_batch: the call size whose rounding the prompt side reproduces.
    bound: the stability prefilter's pass (None: the batch had none). rough_ious: the IoU
    prefilter's len(rows) x 3 IoUs of the rows, where it left prompts out (None: it did not).
    """

    points: np.ndarray
    coords: torch.Tensor
    ious: torch.Tensor
    rows: torch.Tensor
    logits: torch.Tensor
    meta_batch: int | None
    decoded: int = 0
    bound: _MaskBound | None = None
    rough_ious: torch.Tensor | None = None

    def prefilter_holds(self) -> bool:
        """Whether what a prefilter decided on (the stability prefilter's rough masks and IoUs,
        else the IoU prefilter's IoUs) is within STABILITY_CHECK of its margin of the decoded
        rows' values."""
        if self.bound is not None:
            return self.bound.holds(self.logits, self.ious[self.rows])
        off = (self.rough_ious - self.ious[self.rows]).abs()
        return not len(off) or float(off.max()) <= STABILITY_CHECK * PREFILTER_MARGIN


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: torch.nn.Module,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        max_mask_area_fraction: float | None = None,
        decoder_batch: int | None = None,
        fast_decoder: bool = False,
        iou_prefilter: bool = True,
        stability_prefilter: bool | None = None,
        batched_masks: bool | None = None,
    ) -> None:
        """
        Arguments:
          model (Sam): the model.
          points_per_side (int | None): an n x n grid of point prompts on the full image (layer k
            crops get int(n / crop_n_points_downscale_factor**k)). None when point_grids is given.
          points_per_batch (int): point prompts per post-processing batch (memory ~ this).
          pred_iou_thresh (float): keep masks with predicted IoU > this (0 disables).
          stability_score_thresh (float): keep masks with stability >= this (0 disables).
          stability_score_offset (float): logit offset of the stability score (SA-1B: 1.0).
          box_nms_thresh (float): box IoU above which NMS drops a mask within a crop.
          crop_n_layers (int): crop layers; layer k cuts the image into 2^k x 2^k crops.
          crop_nms_thresh (float): box IoU of the NMS across crops (the most zoomed-in wins).
          crop_overlap_ratio (float): crop overlap as a fraction of the short side (SA-1B 512/1500).
          crop_n_points_downscale_factor (int): grid shrink factor per crop layer.
          point_grids (list[np.ndarray] | None): per layer, Nx2 points in [0, 1] (x, y).
          min_mask_region_area (int): fill holes / drop islands smaller than this (0 disables),
            then re-run NMS (SA-1B: 100).
          output_mode (str): "binary_mask" (HxW bool), "uncompressed_rle" or "coco_rle".
          max_mask_area_fraction (float | None): drop masks covering >= this fraction of the image
            (SA-1B: 0.95; None disables, as in Meta's code).
          decoder_batch (int | None): prompts per mask-decoder call; None: 4 on a CPU (small
            batches stay in its cache), points_per_batch on an accelerator (fewer, larger calls).
            Results do not depend on it: the exact mode pads the prompt-side layers' calls to
            round as a call over points_per_batch prompts does, as Meta's generator makes
            (`engine.modeling.batch_rows`).
          fast_decoder (bool): the approximate mode: re-associated decoder attention and a fused
            upscaling layer norm (about 1.5x faster per prompt); predicted IoUs then differ from
            Meta's by ~1e-6, which can swap candidates tied to that precision. False (default):
            Meta's arithmetic, batch shapes and upscaling kernels (predicted IoUs and logits
            bit-identical to Meta's generator run on the same machine).
          iou_prefilter (bool): with pred_iou_thresh > 0, first find the prompts that cannot
            pass the predicted-IoU filter with `engine.modeling.iou_only` (IoUs alone to ~1e-6,
            a fifth of the exact decoder's work or less), and run the decoder (Meta's arithmetic,
            or the re-associated one with fast_decoder) only for the others. The output is the
            same; it pays while up to about three quarters of the prompts pass, so it is skipped
            for a batch when more than that of the crop's previous batch passed.
          stability_prefilter (bool | None): with stability_score_thresh > 0 in the exact mode,
            the IoU pass also gives rough masks (`iou_only.rough_masks`, about half the exact
            decoder's work) for prompts near or over pred_iou_thresh, each mask's stability
            score and crop-edge test are bounded from them with a margin ~500x their largest
            difference seen from Meta's arithmetic, and Meta's arithmetic runs only for prompts
            with a mask that may pass. The same output (a check on the prompts decoded both
            ways turns it off if the margin ever looks thin); it pays because most masks fail
            (fixture set A at 0.88 / 0.95: 171 crop prompts pass the IoU filter, 30 are decoded
            exactly, 24 masks pass); a batch skips it when most prompts of the crop's batches
            before it had a mask that may pass (`STABILITY_PREFILTER_MAX_PASSING`: then it costs more
            than it saves). None: on where masks are windowed on the host (a CPU).
          batched_masks (bool | None): upsample, score and run-length encode `points_per_batch`
            candidates at a time on the model's device at full resolution, as Meta's code does,
            instead of one candidate at a time on its window on the host. The same output; None:
            batched on an accelerator (where the per-candidate host work would dominate),
            windowed on a CPU (where it is several times less work).
        """
        check_generator_params(
            points_per_side=points_per_side, points_per_batch=points_per_batch,
            crop_n_layers=crop_n_layers, crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids, output_mode=output_mode,
            max_mask_area_fraction=max_mask_area_fraction, decoder_batch=decoder_batch,
        )  # fmt: skip
        if points_per_side is not None:
            grids = build_all_layer_point_grids(
                int(points_per_side), int(crop_n_layers), int(crop_n_points_downscale_factor)
            )
        else:
            grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
        self.point_grids = grids
        self.predictor = SamPredictor(model)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.min_mask_region_area = int(min_mask_region_area)
        self.output_mode = output_mode
        self.max_mask_area_fraction = max_mask_area_fraction
        on_cpu = self.predictor.device.type == "cpu"
        if decoder_batch is None:
            decoder_batch = 4 if on_cpu else self.points_per_batch
        self.decoder_batch = int(decoder_batch)
        self.batched_masks = (not on_cpu) if batched_masks is None else bool(batched_masks)
        self.fast_decoder = bool(fast_decoder)
        self.iou_prefilter = bool(iou_prefilter)
        self.stability_prefilter = (
            not self.batched_masks if stability_prefilter is None else bool(stability_prefilter)
        )
        self._passing = (0, 0)  # (prompts, prompts with a mask over pred_iou_thresh): last batch
        # (prompts near or over the IoU threshold, those with a mask that may pass): the crop's
        # batches so far
        self._may_pass = (0, 0)
        self._iou_context: iou_only.IouContext | None = None
        self._low_res_needed: tuple[int, int] | None = None  # the crop's; None: all

    @classmethod
    def from_config(cls, model: torch.nn.Module, config: AmgConfig) -> "SamAutomaticMaskGenerator":
        return cls(model, **config.kwargs())

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image.

        Returns:
          (list[dict]): one record per mask, in Meta's generator order: id (int, index),
            segmentation (HxW bool, or RLE {"size": [H, W], "counts": ...}: COCO compressed
            string for coco_rle, column-major run lengths for uncompressed_rle), bbox XYWH (int),
            area (int), predicted_iou (float), stability_score (float), point_coords [[x, y]]
            (image pixels), crop_box XYWH (int).
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("generate expects an HxWx3 uint8 RGB numpy array")
        if image.dtype != np.uint8:
            raise ValueError(f"generate expects a uint8 image, got {image.dtype}")
        size = (int(image.shape[0]), int(image.shape[1]))
        crop_boxes, layers = generate_crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _Candidates()
        with self.predictor.model.mask_decoder.attention_mode(reassociate=self.fast_decoder):
            for crop_box, layer in zip(crop_boxes, layers):
                data.extend(self._process_crop(image, crop_box, layer, size))
        if len(crop_boxes) > 1 and len(data):
            crops = torch.as_tensor(data.crop_boxes, dtype=torch.int64)
            scores = 1 / ((crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1]))
            data = data.select(nms(torch.as_tensor(data.boxes), scores, self.crop_nms_thresh))
        if self.min_mask_region_area > 0 and len(data):
            data = self._clean_small_regions(data, size)
        return self._records(data, size)

    # -- one crop -------------------------------------------------------------------------------

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, size: tuple[int, int]
    ) -> _Candidates:
        """One crop's candidates, batch by batch in Meta's order, then its NMS.

        Each batch is screened first (`_screen`); the prompts it leaves for Meta's arithmetic wait
        until `decoder_batch` of them are at hand, across batches, so that few decoder calls are
        padded (a prompt's bits do not depend on its call's other prompts); a batch's masks are
        made as soon as all of its prompts are decoded, in batch order (`_decode_waiting`)."""
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = (int(crop.shape[0]), int(crop.shape[1]))
        self.predictor.set_image(crop)
        self._iou_context = None  # the prefilter's per-image part, made on first use
        self._passing = (0, 0)  # a crop is a new image: its first batch always takes the IoU pass
        self._may_pass = (0, 0)  # ... and the stability prefilter
        upsampler = MaskUpsampler(
            tuple(self.predictor.model.prompt_encoder.mask_input_size),
            self.predictor.model.img_size,
            self.predictor.input_size,
            crop_size,
        )
        self._low_res_needed = upsampler.low_res_needed  # (the upscaling skips the padding's rows)
        points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
        data = _Candidates()
        local_boxes = []
        waiting: deque[_Batch] = deque()
        for start in range(0, len(points), self.points_per_batch):
            waiting.append(
                self._screen(points[start : start + self.points_per_batch], upsampler, crop_box, size)
            )
            last = start + self.points_per_batch >= len(points)
            self._decode_waiting(waiting, flush=last)
            while waiting and waiting[0].decoded == len(waiting[0].rows):
                self._check_bound(waiting[0])
                batch, boxes = self._process_batch(waiting.popleft(), upsampler, crop_box, size)
                data.extend(batch)
                local_boxes.extend(boxes)
        self.predictor.reset_image()
        if not len(data):
            return data
        keep = nms(torch.as_tensor(local_boxes), torch.as_tensor(data.iou_preds), self.box_nms_thresh)
        return data.select(keep)

    def _screen(
        self, points: np.ndarray, upsampler: MaskUpsampler, crop_box: list[int], size: tuple[int, int]
    ) -> "_Batch":
        """Which prompts of a batch of single foreground points need Meta's arithmetic.

        A prompt is left out only when none of its masks can pass the filters: the rough pass's
        masks bound every one under the stability filter or on a crop edge, or (without a
        stability threshold) its IoU-only-pass IoUs are all under `pred_iou_thresh`. Left-out
        masks are only ever dropped, so the output is that of decoding every prompt."""
        predictor = self.predictor
        coords = predictor.transform.apply_coords(points, predictor.original_size)
        coords = torch.as_tensor(coords, device=predictor.device)[:, None, :]  # float64, as Meta's
        threshold = self._iou_threshold()
        rows = torch.arange(len(coords), device=coords.device)
        ious = None
        bound = None
        rough = None
        prompts, passing = self._passing
        if self._bounds_masks():
            bound = self._mask_bound(coords, threshold, upsampler, crop_box, size)
            ious = bound.ious.clone()
            rows = bound.may_pass.to(rows.device).nonzero()[:, 0]
        elif threshold is not None and self.iou_prefilter and passing <= PREFILTER_MAX_PASSING * prompts:
            ious = self._rough_ious(coords)
            rows = (ious > threshold - PREFILTER_MARGIN).any(1).nonzero()[:, 0]
            rough = ious[rows] if len(rows) < len(coords) else None  # (a copy: checked once decoded)
        masks = self.predictor.model.mask_decoder.num_mask_tokens - 1
        if ious is None:  # every prompt through Meta's arithmetic
            ious = torch.zeros(len(coords), masks, device=coords.device)
        logits = ious.new_zeros(len(rows), masks, *self._low_res_size())
        # The exact mode computes the prompt tokens as Meta's batch of len(points) would.
        meta_batch = None if self.fast_decoder else len(points)
        return _Batch(points, coords, ious, rows, logits, meta_batch, bound=bound, rough_ious=rough)

    def _decode_waiting(self, waiting: "deque[_Batch]", flush: bool) -> None:
        """Meta's arithmetic for the screened prompts of the waiting batches, in order, in full
        calls (`_call_size`) of prompts of batches of the same size (their prompt side rounds as
        that size's call); fewer are left waiting for the next batch unless `flush`."""
        todo = [(batch, j) for batch in waiting for j in range(batch.decoded, len(batch.rows))]
        threshold = self._iou_threshold()
        while todo:
            meta_batch = todo[0][0].meta_batch
            same = next((i for i, (b, _) in enumerate(todo) if b.meta_batch != meta_batch), len(todo))
            size = self._call_size(meta_batch)
            count = same if flush or same < len(todo) else same - same % size
            if not count:
                break
            part, todo = todo[:count], todo[same:]
            coords = torch.cat([batch.coords[batch.rows[j : j + 1]] for batch, j in part])
            positions = [int(batch.rows[j]) for batch, j in part]
            with batch_rows.as_batch_of(meta_batch):
                logits, ious = self._run_decoder(coords, threshold, positions)
            for n, (batch, j) in enumerate(part):
                batch.logits[j] = logits[n]
                batch.ious[batch.rows[j]] = ious[n]
                batch.decoded = j + 1

    def _check_bound(self, batch: "_Batch") -> None:
        """Once a batch's screened prompts are decoded, before its masks: if the rough masks or
        IoUs turn out further from Meta's arithmetic than the prefilter's margin allows (never
        seen), or the prefilter was turned off meanwhile, decode the prompts it dropped too."""
        bound = batch.bound
        if bound is not None and not bound.may_pass.all():
            prefilter, what, left_out = "stability_prefilter", "the rough masks differ", ~bound.may_pass
        elif batch.rough_ious is not None:
            prefilter, what = "iou_prefilter", "the IoU pass differs"
            left_out = torch.ones(len(batch.coords), dtype=torch.bool)
            left_out[batch.rows.cpu()] = False
        else:
            return
        if getattr(self, prefilter):
            if batch.prefilter_holds():
                return
            warnings.warn(
                f"{prefilter}: {what} from Meta's arithmetic by more than {STABILITY_CHECK} of "
                f"its margin on this model; it is now off",
                RuntimeWarning,
                stacklevel=3,
            )
            setattr(self, prefilter, False)
        self._decode_dropped(batch, left_out)

    def _decode_dropped(self, batch: "_Batch", dropped_mask: torch.Tensor) -> None:
        """Meta's arithmetic for the prompts a prefilter left out of a batch (`dropped_mask`)."""
        dropped = dropped_mask.nonzero()[:, 0].to(batch.rows.device)
        with batch_rows.as_batch_of(batch.meta_batch):
            logits, ious = self._run_decoder(
                batch.coords[dropped], self._iou_threshold(), dropped.tolist()
            )
        batch.ious[dropped] = ious
        rows, order = torch.cat([batch.rows, dropped]).sort()
        batch.rows, batch.logits = rows, torch.cat([batch.logits, logits])[order]
        batch.decoded = len(rows)

    def _iou_threshold(self) -> float | None:
        return self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None

    def _bounds_masks(self) -> bool:
        near, may_pass = self._may_pass
        return (
            self.stability_prefilter
            and self.stability_score_thresh > 0.0
            and not self.fast_decoder
            and may_pass <= STABILITY_PREFILTER_MAX_PASSING * near
        )

    def _mask_bound(
        self,
        coords: torch.Tensor,
        threshold: float | None,
        upsampler: MaskUpsampler,
        crop_box: list[int],
        size: tuple[int, int],
    ) -> "_MaskBound":
        """The stability prefilter: rough masks of `coords` (`iou_only.rough_masks`, upscaled only
        for prompts with an IoU within PREFILTER_MARGIN of the threshold; the re-associated
        decoder for a decoder iou_only does not know), and which prompts have a mask that may
        pass.

        Their low-res logits are within ~2e-6 of 1 + the batch's largest |logit| of Meta's (fixture
        crops), and a bilinear resize is a convex combination, so with `delta` a wide bound on
        that difference a mask's exact pixel counts lie between those of these logits above
        threshold + delta and above threshold - delta. A mask cannot pass when its largest
        possible stability score (most pixels over `mask_threshold + offset` over fewest over
        `mask_threshold - offset`) is under `stability_score_thresh`, or when the pixels surely
        in it already reach an inner crop edge (`surely_near_crop_edge`)."""
        model = self.predictor.model
        min_iou = None if threshold is None else threshold - PREFILTER_MARGIN
        if iou_only.supports(model.mask_decoder):
            rows, logits, ious = self._rough_pass(coords, min_iou, masks=True)
        else:
            with model.mask_decoder.attention_mode(reassociate=True), batch_rows.as_batch_of(None):
                logits, ious = self._run_decoder(coords, min_iou)
            rows = torch.arange(len(coords), device=ious.device)
            if min_iou is not None:
                rows = (ious > min_iou).any(1).nonzero()[:, 0]
            logits = logits[rows]
        host = logits.cpu()  # rows' logits: host[r] is prompt rows[r]'s
        rows = rows.cpu()
        candidates = ious[rows].cpu() > (-math.inf if min_iou is None else min_iou)
        t = float(model.mask_threshold)
        offset = self.stability_score_offset
        scale = 1.0 + (max(-float(host.min()), float(host.max())) if host.numel() else 0.0)
        delta = STABILITY_MARGIN * scale
        floor = t - abs(offset) - delta - 1e-3 * scale  # (the window's rounding margin)
        x0, y0 = crop_box[0], crop_box[1]
        may_pass = torch.zeros(len(coords), dtype=torch.bool)
        for r, k in candidates.nonzero().tolist():
            b = int(rows[r])
            if may_pass[b]:
                continue
            window, top, left = upsampler.window(host[r, k], floor)
            most = int((window > t + offset - delta).sum())  # pixels over the high threshold, at most
            fewest = int((window > t - offset + delta).sum())  # over the low one, at least
            if not most or (fewest and most / fewest < self.stability_score_thresh * (1 - 1e-6)):
                continue
            inner = tight_box((window > t + delta).numpy())
            if inner is not None:
                box = [inner[0] + left + x0, inner[1] + top + y0, inner[2] + left + x0, inner[3] + top + y0]
                if surely_near_crop_edge(box, crop_box, size):
                    continue
            may_pass[b] = True
        kept = may_pass[rows]  # (every prompt that may pass has rough logits)
        near, count = self._may_pass
        self._may_pass = (near + len(rows), count + int(may_pass.sum()))
        return _MaskBound(
            host[kept], ious, may_pass, delta, threshold is not None, self._low_res_needed
        )

    def _rough_ious(self, coords: torch.Tensor) -> torch.Tensor:
        """Bx3 predicted IoUs to ~1e-6 (the IoU prefilter's pass)."""
        return self._rough_pass(coords, None, masks=False)[2]

    def _rough_pass(
        self, coords: torch.Tensor, min_iou: float | None, masks: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """`engine.modeling.iou_only` over `coords`, with the image's part computed once per
        crop: (rows, logits, ious): Bx3 predicted IoUs to ~1e-6 and, with `masks`, the Rx3
        low-res logits, to ~2e-6 of 1 + the largest, of the R prompts `rows` with an IoU over
        `min_iou` (None: all)."""
        model = self.predictor.model
        decoder = model.mask_decoder
        if not iou_only.supports(decoder):
            with decoder.attention_mode(reassociate=True):
                return None, None, self._run_decoder(coords, math.inf)[1]  # IoUs only: no upscaling
        if self._iou_context is None:
            no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            self._iou_context = iou_only.iou_context(
                decoder, self.predictor.features, no_mask, model.prompt_encoder.get_dense_pe()
            )
        size = tuple(self.predictor.features.shape[-2:])
        rows, logits, ious = [], [], []
        for start in range(0, coords.shape[0], self.decoder_batch):
            part = coords[start : start + self.decoder_batch]
            labels = torch.ones(part.shape[:2], dtype=torch.int, device=part.device)
            sparse, _ = model.prompt_encoder(points=(part, labels), boxes=None, masks=None)
            if masks:
                part_rows, part_logits, part_ious = iou_only.rough_masks(
                    decoder, self._iou_context, sparse, size, min_iou, self._low_res_needed
                )
                rows.append(part_rows + start)
                logits.append(part_logits)
            else:
                part_ious = iou_only.iou_predictions(decoder, self._iou_context, sparse)
            ious.append(part_ious[:, 1:])
        if not masks:
            return None, None, torch.cat(ious)
        return torch.cat(rows), torch.cat(logits), torch.cat(ious)

    def _call_size(self, meta_batch: int | None) -> int:
        """Prompts a decoder call takes: `decoder_batch`, or Meta's batch where that is smaller
        (in the exact mode a call of 1-3 prompts rounds as Meta's call of that many, not as 4)."""
        return self.decoder_batch if meta_batch is None else min(self.decoder_batch, meta_batch)

    def _run_decoder(
        self, coords: torch.Tensor, min_iou: float | None, positions: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder over `coords` (Bx1x2, input frame), `_call_size` prompts a call (of
        the `batch_rows.as_batch_of` in force); `positions`: the prompts' positions in Meta's
        batch (None: 0, 1, 2, ...), whose rounding their prompt side reproduces.

        A short last call is padded to that size with copies of its last one: the float32 matrix
        kernels round differently for one or two prompts than for four or more, and a prompt's
        result must not depend on where the batch ends."""
        model = self.predictor.model
        dense_pe = model.prompt_encoder.get_dense_pe()
        size = self._call_size(batch_rows.batch_of())
        logits, ious = [], []
        for start in range(0, coords.shape[0], size):
            part = coords[start : start + size]
            real = part.shape[0]
            at = None if positions is None else positions[start : start + size] + [-1] * (size - real)
            if real < size:
                part = torch.cat([part, part[-1:].expand(size - real, -1, -1)])
            labels = torch.ones(part.shape[:2], dtype=torch.int, device=part.device)
            with batch_rows.at_positions(at):
                sparse, dense = model.prompt_encoder(points=(part, labels), boxes=None, masks=None)
                low_res, iou = model.mask_decoder(
                    image_embeddings=self.predictor.features,
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=True,
                    min_iou=min_iou,
                    low_res_rows=None if self._low_res_needed is None else self._low_res_needed[0],
                )
            logits.append(low_res[:real].float())
            ious.append(iou[:real].float())
        return torch.cat(logits), torch.cat(ious)

    def _low_res_size(self) -> tuple[int, int]:
        return tuple(4 * s for s in self.predictor.features.shape[-2:])

    def _process_batch(
        self, batch: _Batch, upsampler: MaskUpsampler, crop_box: list[int], size: tuple[int, int]
    ) -> tuple[_Candidates, list[list[int]]]:
        """A decoded batch's candidates that pass the filters, in Meta's (point-major) order."""
        per_point = batch.logits.shape[1]
        rows = batch.rows.cpu().numpy()
        low_res = batch.logits.flatten(0, 1)
        iou_preds = batch.ious[batch.rows].flatten()
        points = batch.points[rows].repeat(per_point, axis=0)
        live = torch.ones_like(iou_preds, dtype=torch.bool)
        if self.pred_iou_thresh > 0.0:
            live &= iou_preds > self.pred_iou_thresh
        order = live.nonzero()[:, 0]
        iou_preds = iou_preds.cpu()
        masks = self._batched_masks if self.batched_masks else self._windowed_masks
        x0, y0 = crop_box[0], crop_box[1]
        image_area = size[0] * size[1]
        threshold = self._iou_threshold()
        if threshold is not None:
            self._passing = (len(batch.points), int((batch.ious > threshold).any(1).sum()))
        out = _Candidates()
        local_boxes = []
        kept = set()
        for i, score, local, runs in masks(low_res, order, upsampler, crop_box, size):
            kept.add(i // per_point)
            if (
                self.max_mask_area_fraction is not None
                and runs_area(runs) >= self.max_mask_area_fraction * image_area
            ):
                continue
            out.runs.append(runs)
            out.boxes.append([local[0] + x0, local[1] + y0, local[2] + x0, local[3] + y0])
            out.iou_preds.append(float(iou_preds[i]))
            out.stability.append(score)
            out.points.append([float(points[i, 0]) + x0, float(points[i, 1]) + y0])
            out.crop_boxes.append(list(crop_box))
            local_boxes.append(local)
        if batch.bound is None:  # what the stability prefilter would have upscaled and kept, at least
            near = len(batch.points) if threshold is None else int(
                (batch.ious > threshold - PREFILTER_MARGIN).any(1).sum()
            )
            before, count = self._may_pass
            self._may_pass = (before + near, count + len(kept))
        return out, local_boxes

    def _windowed_masks(
        self, low_res: torch.Tensor, order: torch.Tensor, upsampler: MaskUpsampler, crop_box, size
    ) -> Iterator[tuple[int, float, list[int], np.ndarray]]:
        """Candidates passing the stability and crop-edge filters, one at a time on the host:
        (index, stability score, inclusive box in the crop, full-image runs). Only logits above
        the lowest threshold matter, so each candidate's full-resolution logits are computed on
        the window that can exceed it (less a margin for the resizes' rounding)."""
        low_res = low_res.cpu()
        threshold = float(self.predictor.model.mask_threshold)
        offset = self.stability_score_offset
        x0, y0 = crop_box[0], crop_box[1]
        scale = float(low_res.abs().max()) if low_res.numel() else 0.0
        floor = threshold - abs(offset) - 1e-3 * (1.0 + scale)
        for i in order.tolist():
            logits, top, left = upsampler.window(low_res[i], floor)
            high = (logits > threshold + offset).sum(dtype=torch.int32)
            low = (logits > threshold - offset).sum(dtype=torch.int32)
            ratio = high / low  # float32; 0/0 = NaN, as in Meta's code
            # compared as a float32 tensor, as Meta's filter does (19/20 passes a 0.95 threshold)
            if self.stability_score_thresh > 0.0 and not bool(ratio >= self.stability_score_thresh):
                continue
            score = float(ratio)
            mask = (logits > threshold).numpy()
            box = tight_box(mask)
            local = [0, 0, 0, 0]
            if box is not None:
                local = [box[0] + left, box[1] + top, box[2] + left, box[3] + top]
            if self._on_crop_edge(local, crop_box, size):
                continue
            if box is None:
                window = mask[:0, :0]
            else:
                window = mask[box[1] : box[3] + 1, box[0] : box[2] + 1]
            yield i, score, local, window_to_runs(window, local[1] + y0, local[0] + x0, size)

    def _batched_masks(
        self, low_res: torch.Tensor, order: torch.Tensor, upsampler: MaskUpsampler, crop_box, size
    ) -> Iterator[tuple[int, float, list[int], np.ndarray]]:
        """`_windowed_masks` for `points_per_batch` candidates at a time on the model's device,
        at full resolution as Meta's code does (an accelerator's path: the same arithmetic, with
        only edge positions and scores leaving the device)."""
        threshold = float(self.predictor.model.mask_threshold)
        offset = self.stability_score_offset
        for chunk in order.split(self.points_per_batch):
            logits = upsampler.logits(low_res[chunk])
            high = (logits > threshold + offset).sum((1, 2), dtype=torch.int32)
            low = (logits > threshold - offset).sum((1, 2), dtype=torch.int32)
            scores = high / low  # float32; 0/0 = NaN, as in Meta's code
            keep = torch.ones_like(scores, dtype=torch.bool)
            if self.stability_score_thresh > 0.0:
                keep = scores >= self.stability_score_thresh
            masks = logits[keep] > threshold
            del logits
            boxes = [[0, 0, 0, 0] if b[0] < 0 else b for b in mask_boxes(masks).tolist()]
            origin = np.asarray([crop_box[0], crop_box[1], crop_box[0], crop_box[1]])
            image_boxes = np.asarray(boxes, np.int64).reshape(-1, 4) + origin
            inside = np.flatnonzero(~near_crop_edge(image_boxes, crop_box, size)).tolist()
            runs = masks_to_runs(masks[inside], crop_box[1], crop_box[0], size)
            index, scores = chunk[keep].tolist(), scores[keep].tolist()
            for k, mask_runs in zip(inside, runs):
                yield index[k], scores[k], boxes[k], mask_runs

    @staticmethod
    def _on_crop_edge(local: list[int], crop_box: list[int], size: tuple[int, int]) -> bool:
        x0, y0 = crop_box[0], crop_box[1]
        box = [local[0] + x0, local[1] + y0, local[2] + x0, local[3] + y0]
        return bool(near_crop_edge(np.asarray([box]), crop_box, size)[0])

    # -- after all crops ------------------------------------------------------------------------

    def _clean_small_regions(self, data: _Candidates, size: tuple[int, int]) -> _Candidates:
        """Meta's postprocess_small_regions: clean each mask, re-run NMS preferring unchanged masks."""
        min_area = self.min_mask_region_area
        boxes, scores, cleaned = [], [], {}
        for i, (runs, box) in enumerate(zip(data.runs, data.boxes)):
            if runs_area(runs) == 0:
                boxes.append([0, 0, 0, 0])
                scores.append(1.0)
                continue
            window, top, left = runs_to_window(runs, size, tuple(box), margin=1)
            result = clean_window(window, top, left, size, min_area)
            if result is None:
                mask, changed = clean_mask(runs_to_mask(runs, size), min_area)
                top = left = 0
            else:
                mask, changed = result
            new_box = tight_box(mask)
            if new_box is None:  # cannot happen (the largest island stays), kept for safety
                new_box, changed = (0, 0, -left, -top), True
            boxes.append([new_box[0] + left, new_box[1] + top, new_box[2] + left, new_box[3] + top])
            scores.append(0.0 if changed else 1.0)
            if changed:
                cleaned[i] = (mask, top, left)
        keep = nms(torch.as_tensor(boxes), torch.as_tensor(scores), max(self.box_nms_thresh, self.crop_nms_thresh))
        for i in keep.tolist():
            if i in cleaned:
                mask, top, left = cleaned[i]
                data.runs[i] = window_to_runs(mask, top, left, size)
                data.boxes[i] = boxes[i]
        return data.select(keep)

    def _records(self, data: _Candidates, size: tuple[int, int]) -> list[dict[str, Any]]:
        from engine import rle

        records = []
        for i in range(len(data)):
            runs = data.runs[i]
            if self.output_mode == "coco_rle":
                segmentation: Any = rle.from_uncompressed(size, runs.tolist())
            elif self.output_mode == "uncompressed_rle":
                segmentation = {"size": [size[0], size[1]], "counts": runs.tolist()}
            else:
                segmentation = runs_to_mask(runs, size)
            x0, y0, x1, y1 = data.boxes[i]
            cx0, cy0, cx1, cy1 = data.crop_boxes[i]
            records.append(
                {
                    "id": i,
                    "segmentation": segmentation,
                    "area": runs_area(runs),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "predicted_iou": data.iou_preds[i],
                    "point_coords": [data.points[i]],
                    "stability_score": data.stability[i],
                    "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
                }
            )
        return records


def mask_records(records: list[dict[str, Any]]) -> list["MaskRecord"]:
    """Generator records -> SA-1B `MaskRecord`s (binary masks are encoded to COCO RLE here).

    Ids are the records' ids (their index); the shard runner renumbers them per image.
    """
    from engine import rle
    from engine.records import MaskRecord

    out = []
    for record in records:
        segmentation = record["segmentation"]
        if isinstance(segmentation, np.ndarray):
            segmentation = rle.encode(segmentation)[0]
        elif isinstance(segmentation.get("counts"), list):
            segmentation = rle.from_uncompressed(segmentation["size"], segmentation["counts"])
        out.append(
            MaskRecord(
                id=int(record["id"]),
                segmentation=segmentation,
                bbox=[int(v) for v in record["bbox"]],
                area=int(record["area"]),
                predicted_iou=float(record["predicted_iou"]),
                stability_score=float(record["stability_score"]),
                crop_box=[int(v) for v in record["crop_box"]],
                point_coords=[[float(x), float(y)] for x, y in record["point_coords"]],
            )
        )
    return out


def image_record(
    records: list[dict[str, Any]], image_id: int, width: int, height: int, file_name: str
) -> "ImageRecord":
    """Generator records of one image -> an SA-1B `ImageRecord` ({"image": ..., "annotations": ...})."""
    from engine.records import ImageMeta, ImageRecord

    meta = ImageMeta(image_id=int(image_id), width=int(width), height=int(height), file_name=file_name)
    return ImageRecord(meta, mask_records(records))
