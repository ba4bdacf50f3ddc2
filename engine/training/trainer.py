"""The SAM training loop (paper appendix A) on a list of images with reference masks.

Each step takes one image and `masks_per_image` of its masks and plays the interactive simulation
for `rounds` rounds: the first prompt is a point or a noisy box, each later round adds a corrective
click from the error region of the previous prediction, except two rounds that add no point (one at
a random place, one at the end); the previous round's logits are fed back as the mask prompt. The
loss (focal:dice 20:1 through the lowest-loss output, MSE on the IoU head) is back-propagated every
round; AdamW with linear warm-up then cosine decay.

With a frozen backbone the backbone features of every image are computed once and cached (fp16),
so a step costs only the neck and the decoder: this is what makes CPU training possible. Training
may run at a smaller encoder input (`image_size`, e.g. 512 for a 32x32 grid) than the model's
1024: the MobileNetV2 encoder, prompt encoder and decoder have no fixed grid.

The same loop trains data-parallel on the workers of a torch.distributed process group (Ray Train,
`sa-engine train --address`; see `collective.py`): each worker caches its rank's slice of the
images, draws its own images and prompts (seed + rank), and every step's gradients are averaged
over the workers before clipping and the optimiser step, so the weights stay the same everywhere
and a step sees one image per worker. The model may live on a GPU; the cache stays in host memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from engine.checks import invalid
from engine.modeling import Sam
from engine.training.collective import (
    average_gradients,
    broadcast_state,
    gather,
    mean_over_workers,
    rank_and_world,
)
from engine.training.losses import sam_loss
from engine.training.prompts import error_points, first_point, noisy_box
from engine.transforms import ResizeLongestSide


@dataclass
class TrainConfig:
    """The `train:` block of the configs (configs/sa1b.yaml holds the paper's values).

    Attributes:
      steps (int): optimiser steps (one image, `masks_per_image` masks each).
      masks_per_image (int): prompts per step.
      rounds (int): interactive rounds per mask (11 in the paper).
      rounds_without_point (int): rounds adding no new point (2 in the paper: one random, the last).
      box_probability (float): chance that the first prompt is a noisy box instead of a point.
      box_noise (float), box_noise_max_px (float): box corner noise, share of the side and cap
        (pixels of the 1024 frame).
      lr (float), warmup_steps (int), weight_decay (float), min_lr_ratio (float): AdamW, linear
        warm-up, cosine decay down to lr * min_lr_ratio.
      focal_weight, dice_weight, iou_weight (float): loss weights (20 : 1, and 1 for the IoU MSE).
      max_mask_area (float): masks covering more of the image than this are left out.
      freeze_backbone (bool): freeze the image encoder except its neck (MobileNetV2 encoder).
      freeze_image_encoder (bool): freeze the whole image encoder (neck included).
      image_sizes (list[int]): encoder input sides used in training, assigned to images in turn
        (a frozen-backbone cache is computed at these sizes). [1024] is the model's own.
      seed (int): sampling seed (images, masks, prompts).
      grad_clip (float): max gradient norm (0: none).
      log_every (int): steps between progress lines.
    """

    steps: int = 2000
    masks_per_image: int = 8
    rounds: int = 11
    rounds_without_point: int = 2
    box_probability: float = 0.5
    box_noise: float = 0.1
    box_noise_max_px: float = 20.0
    lr: float = 8e-4
    warmup_steps: int = 250
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.05
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    max_mask_area: float = 0.9
    freeze_backbone: bool = True
    freeze_image_encoder: bool = False
    image_sizes: list[int] = field(default_factory=lambda: [1024])
    seed: int = 0
    grad_clip: float = 1.0
    log_every: int = 25

    def validate(self) -> None:
        for name in ("steps", "masks_per_image", "rounds", "log_every"):
            if getattr(self, name) < 1:
                raise invalid(f"train.{name}", getattr(self, name), "a whole number >= 1")
        if not 0 <= self.rounds_without_point < self.rounds:
            raise invalid(
                "train.rounds_without_point", self.rounds_without_point,
                f"0 .. train.rounds - 1 ({self.rounds - 1}): the first round always has a prompt",
            )  # fmt: skip
        if self.warmup_steps < 0:
            raise invalid("train.warmup_steps", self.warmup_steps, "a whole number >= 0")
        if not self.lr > 0:
            raise invalid("train.lr", self.lr, "a learning rate > 0")
        for name in ("weight_decay", "box_noise", "box_noise_max_px", "focal_weight",
                     "dice_weight", "iou_weight", "grad_clip"):  # fmt: skip
            if getattr(self, name) < 0:
                raise invalid(f"train.{name}", getattr(self, name), "a value >= 0")
        if not self.focal_weight + self.dice_weight + self.iou_weight > 0:
            raise invalid("train.focal_weight", self.focal_weight, "weights whose sum is > 0")
        for name in ("min_lr_ratio", "box_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise invalid(f"train.{name}", getattr(self, name), "a share in [0, 1]")
        if not 0 < self.max_mask_area <= 1:
            raise invalid(
                "train.max_mask_area", self.max_mask_area,
                "a share of the image in (0, 1]",
            )  # fmt: skip
        bad = [s for s in self.image_sizes if s < 64 or s % 16]
        if not self.image_sizes or bad:
            raise invalid(
                "train.image_sizes", self.image_sizes,
                "sides that are multiples of 16, >= 64",
            )  # fmt: skip


class MasksDoNotFitImage(ValueError):
    """An item's reference masks are another size than its image (a COCO file written for the
    image's stored pixels, the photo EXIF-rotated): resizing them would train on wrong masks."""

    reason = "masks do not fit the image"


def left_out_reason(exc: Exception) -> str:
    """Why an item whose loader raised `exc` is left out (training and the gate count by it)."""
    return getattr(exc, "reason", "unreadable image")


@dataclass
class TrainItem:
    """One training image: a loader (so images are read once, while caching) and its masks.

    Attributes:
      image_id (str): name for logs and the card.
      load (Callable[[], tuple[np.ndarray, list[np.ndarray]]]): returns the HxWx3 uint8 RGB image
        and its HxW bool reference masks.
    """

    image_id: str
    load: Callable[[], tuple[np.ndarray, list[np.ndarray]]]


@dataclass
class _Encoded:
    features: tuple[torch.Tensor, ...]  # cached backbone outputs (fp16) or () when not cached
    image: torch.Tensor | None  # preprocessed 1x3xSxS input when features are not cached
    targets: torch.Tensor  # Mx(S/4)x(S/4) bool, padded low-res frame
    valid: torch.Tensor  # (S/4)x(S/4) bool: inside the image
    size: int  # encoder input side S

    def to(self, device: torch.device) -> "_Encoded":
        """This image on `device` (itself when it is already there)."""
        if self.targets.device == device:
            return self
        return _Encoded(
            tuple(f.to(device) for f in self.features),
            None if self.image is None else self.image.to(device),
            self.targets.to(device),
            self.valid.to(device),
            self.size,
        )


@dataclass
class TrainResult:
    """Attributes:
    steps (int): optimiser steps run.
    images (int), masks (int): training images and masks used (after filtering), all workers.
    skipped (dict[str, int]): images or masks left out, by reason, all workers.
    loss_history (list[dict]): one entry per `log_every` steps (step, loss, mask, iou, lr), the
      mean over the workers.
    seconds (float): wall time of the loop (caching excluded).
    cache_seconds (float): wall time of reading and encoding the images.
    workers (int): data-parallel workers (1: one process); a step used one image on each.
    """

    steps: int
    images: int
    masks: int
    skipped: dict[str, int]
    loss_history: list[dict[str, float]]
    seconds: float
    cache_seconds: float
    workers: int = 1


def set_resolution(sam: Sam, size: int) -> None:
    """Point the prompt encoder at an encoder input of side `size` (grid size / 16)."""
    grid = size // 16
    pe = sam.prompt_encoder
    pe.input_image_size = (size, size)
    pe.image_embedding_size = (grid, grid)
    pe.mask_input_size = (4 * grid, 4 * grid)
    sam.img_size = size


def _trainable(sam: Sam, config: TrainConfig) -> list[torch.nn.Parameter]:
    encoder = sam.image_encoder
    if config.freeze_image_encoder:
        encoder.requires_grad_(False)
    elif config.freeze_backbone and hasattr(encoder, "backbone"):
        encoder.backbone.requires_grad_(False)
        encoder.freeze_backbone = True
    return [p for p in sam.parameters() if p.requires_grad]


def _cacheable(sam: Sam, config: TrainConfig) -> str:
    """'backbone' (cache backbone outputs, train the neck), 'encoder' (cache embeddings) or ''."""
    if config.freeze_image_encoder:
        return "encoder"
    if config.freeze_backbone and hasattr(sam.image_encoder, "forward_neck"):
        return "backbone"
    return ""


def _low_res_targets(masks: list[np.ndarray], size: int, original: tuple[int, int]) -> torch.Tensor:
    """Masks resized into the padded (size/4)^2 low-res frame of the decoder's logits."""
    low = size // 4
    scale = low / max(original)
    h, w = max(1, round(original[0] * scale)), max(1, round(original[1] * scale))
    out = torch.zeros((len(masks), low, low), dtype=torch.bool)
    for i, mask in enumerate(masks):
        small = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
        out[i, :h, :w] = torch.from_numpy(small >= 0.5)
    return out


def encode_items(
    sam: Sam,
    items: Sequence[TrainItem],
    config: TrainConfig,
    log: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[_Encoded], dict[str, int]]:
    """Read every image once: reference masks to low-res targets, frozen parts to cached features.

    With `world_size` > 1 only this worker's slice, items[rank::world_size], is read; an image's
    training size is the same as in one process (it goes by its place in `items`). The features
    are computed on the model's device and kept in host memory.

    Returns the encoded images and the count of what was left out, by reason.
    """
    mode = _cacheable(sam, config)
    device = sam.pixel_mean.device
    skipped: dict[str, int] = {}
    encoded: list[_Encoded] = []
    start = time.perf_counter()
    mine = range(rank, len(items), world_size)
    for done, index in enumerate(mine, 1):
        item = items[index]
        size = config.image_sizes[index % len(config.image_sizes)]
        try:
            image, masks = item.load()
        except (OSError, ValueError) as exc:
            reason = left_out_reason(exc)
            skipped[reason] = skipped.get(reason, 0) + 1
            log(f"skip {item.image_id}: {exc}")
            continue
        height, width = image.shape[:2]
        kept = []
        for mask in masks:
            share = float(mask.mean())
            if share > config.max_mask_area:
                skipped["mask > max_mask_area"] = skipped.get("mask > max_mask_area", 0) + 1
            elif mask.sum() < 4:
                skipped["empty mask"] = skipped.get("empty mask", 0) + 1
            else:
                kept.append(mask)
        targets = _low_res_targets(kept, size, (height, width))
        nonempty = targets.flatten(1).any(1)
        if (~nonempty).any():
            skipped["mask vanishes at low resolution"] = (
                skipped.get("mask vanishes at low resolution", 0) + int((~nonempty).sum())
            )
        targets = targets[nonempty]
        if len(targets) == 0:
            skipped["image without usable masks"] = skipped.get("image without usable masks", 0) + 1
            continue
        resized = ResizeLongestSide(size).apply_image(image)
        x = torch.as_tensor(resized).permute(2, 0, 1).contiguous().float().to(device)
        x = _preprocess(sam, x, size)
        valid = torch.zeros((size // 4, size // 4), dtype=torch.bool)
        valid[: math.ceil(resized.shape[0] / 4), : math.ceil(resized.shape[1] / 4)] = True
        features: tuple[torch.Tensor, ...] = ()
        if mode:
            with torch.no_grad():
                if mode == "backbone":
                    features = tuple(f.half().cpu() for f in sam.image_encoder.backbone(x))
                else:
                    features = (sam.image_encoder(x).half().cpu(),)
            x = None
        encoded.append(_Encoded(features, None if x is None else x.cpu(), targets, valid, size))
        if done % 50 == 0:
            log(f"encoded {done}/{len(mine)} images ({time.perf_counter() - start:.0f} s)")
    return encoded, skipped


def _preprocess(sam: Sam, x: torch.Tensor, size: int) -> torch.Tensor:
    x = (x - sam.pixel_mean) / sam.pixel_std
    return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2])).unsqueeze(0)


def _embed(sam: Sam, item: _Encoded, mode: str) -> torch.Tensor:
    if mode == "backbone":
        return sam.image_encoder.forward_neck(*(f.float() for f in item.features))
    if mode == "encoder":
        return item.features[0].float()
    return sam.image_encoder(item.image)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    sam: Sam,
    items: Sequence[TrainItem],
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `sam` in place on `items`.

    In a torch.distributed process group (one call per worker, every worker with the same
    `items` and model) the workers train one model together: see the module docstring.

    Arguments:
      sam (Sam): the model to train, on its device (its weights are updated; it is left in eval mode).
      items (Sequence[TrainItem]): images and reference masks (all of them, on every worker).
      config (TrainConfig): the recipe.
      log (Callable[[str], None]): progress lines.
    Returns:
      (TrainResult): counts, loss history, timings.
    """
    config.validate()
    rank, world = rank_and_world()
    if not items:
        raise ValueError("no training images: the selected sources hold no masks")
    if len(items) < world:
        raise ValueError(
            f"{len(items)} training image(s) for {world} workers: every worker needs at least one; "
            "use fewer workers (train.workers) or more data"
        )
    model_size = sam.img_size
    params = _trainable(sam, config)
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    if any(s != model_size for s in config.image_sizes) and not hasattr(sam.image_encoder, "forward_neck"):
        raise ValueError(
            f"train.image_sizes {config.image_sizes}: only the mobilenet_v2 encoder trains at another "
            f"input size than the model's {model_size}"
        )
    broadcast_state(sam)
    mode = _cacheable(sam, config)
    cache_start = time.perf_counter()
    sam.eval()
    encoded, skipped = encode_items(sam, items, config, log, rank, world)
    cache_seconds = time.perf_counter() - cache_start
    counts = gather((len(encoded), sum(len(e.targets) for e in encoded), skipped))
    skipped = {}
    for _, _, left_out in counts:
        for reason, count in left_out.items():
            skipped[reason] = skipped.get(reason, 0) + count
    if any(images == 0 for images, _, _ in counts):
        where = "" if world == 1 else f" on worker(s) {[r for r, c in enumerate(counts) if c[0] == 0]}"
        raise ValueError(f"no usable training images{where} (left out: {skipped})")
    n_images = sum(c[0] for c in counts)
    n_masks = sum(c[1] for c in counts)
    on = "" if world == 1 else f" ({world} workers)"
    log(f"training on {n_images} images, {n_masks} masks{on} ({cache_seconds:.0f} s to encode)")

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed + rank)
    torch.manual_seed(config.seed)
    history: list[dict[str, float]] = []
    window: list[tuple[float, float, float, float]] = []
    device = sam.pixel_mean.device
    sam.train()
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            item = encoded[int(rng.integers(len(encoded)))]
            window.append(train_step(sam, optimizer, params, item.to(device), mode, config, rng, step))
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                local = [float(np.mean([w[i] for w in window])) for i in range(4)]
                loss, mask, iou, last_iou = mean_over_workers(local, device)
                history.append(
                    {"step": step + 1, "loss": loss, "mask_loss": mask, "iou_loss": iou,
                     "last_round_iou": last_iou, "lr": lr_at(step, config)}
                )
                elapsed = time.perf_counter() - start
                log(
                    f"step {step + 1}/{config.steps} loss {loss:.4f} (mask {mask:.4f}, iou {iou:.4f}) "
                    f"last-round IoU {last_iou:.3f} lr {lr_at(step, config):.2e} "
                    f"{elapsed / (step + 1):.2f} s/step"
                )
                window = []
    finally:
        set_resolution(sam, model_size)
        sam.eval()
    return TrainResult(
        steps=config.steps,
        images=n_images,
        masks=n_masks,
        skipped=skipped,
        loss_history=history,
        seconds=time.perf_counter() - start,
        cache_seconds=cache_seconds,
        workers=world,
    )


def train_step(
    sam: Sam,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    item: _Encoded,
    mode: str,
    config: TrainConfig,
    rng: np.random.Generator,
    step: int,
) -> tuple[float, float, float, float]:
    """One optimiser step on one image (on the model's device): learning rate of `step`, the
    interactive rounds, gradients averaged over the workers (if any), clipping, AdamW.

    Returns the step's (loss, mask loss, IoU loss, IoU of the last round), this worker's.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    set_resolution(sam, item.size)
    optimizer.zero_grad(set_to_none=True)
    stats = _simulate(sam, item, mode, config, rng)
    average_gradients(params)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return stats


def _simulate(
    sam: Sam, item: _Encoded, mode: str, config: TrainConfig, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """One step: the interactive rounds on a batch of the image's masks; gradients accumulated."""
    device = item.targets.device
    count = min(config.masks_per_image, len(item.targets))
    chosen = rng.choice(len(item.targets), size=count, replace=False)
    targets = item.targets[torch.as_tensor(chosen, device=device)]  # BxLxL bool
    target_f = targets.unsqueeze(1).float()
    stride = item.size / targets.shape[-1]  # input pixels per low-res cell (4)

    embedding = _embed(sam, item, mode)
    detached = embedding.detach().requires_grad_(embedding.requires_grad)
    dense_pe = sam.prompt_encoder.get_dense_pe()

    use_box = rng.random() < config.box_probability
    box = None
    coords = np.zeros((count, 0, 2))
    labels = np.zeros((count, 0))
    target_np = targets.cpu().numpy()
    if use_box:
        cap = config.box_noise_max_px / stride * (item.size / 1024)
        boxes = np.stack([noisy_box(t, rng, config.box_noise, cap) for t in target_np])
        box = torch.as_tensor((boxes + 0.5) * stride - 0.5, dtype=torch.float32, device=device)
    else:
        coords = np.array([[first_point(t, rng)] for t in target_np])
        labels = np.ones((count, 1))
    silent = set()
    if config.rounds_without_point:
        silent.add(config.rounds - 1)
        middle = list(range(1, config.rounds - 1))
        extra = config.rounds_without_point - 1
        if extra and middle:
            silent.update(rng.choice(middle, size=min(extra, len(middle)), replace=False).tolist())

    mask_input = None
    pred = None
    totals = [0.0, 0.0, 0.0]
    for round_ in range(config.rounds):
        if round_ > 0 and round_ not in silent:
            new, new_labels = error_points(pred, targets, item.valid, rng)
            coords = np.concatenate([coords, new[:, None]], axis=1)
            labels = np.concatenate([labels, new_labels[:, None]], axis=1)
        points = None
        if coords.shape[1]:
            points = (
                torch.as_tensor((coords + 0.5) * stride - 0.5, dtype=torch.float32, device=device),
                torch.as_tensor(labels, dtype=torch.float32, device=device),
            )
        sparse, dense = sam.prompt_encoder(points, box, mask_input)
        multimask = box is None and coords.shape[1] == 1
        logits, iou_pred = sam.mask_decoder(detached, dense_pe, sparse, dense, multimask)
        out = sam_loss(
            logits, iou_pred, target_f, config.focal_weight, config.dice_weight, config.iou_weight
        )
        (out.total / config.rounds).backward()
        rows = torch.arange(count, device=device)
        best = logits.detach()[rows, out.chosen].unsqueeze(1)
        mask_input = best
        pred = best[:, 0] > 0
        totals[0] += float(out.total.detach()) / config.rounds
        totals[1] += float(out.mask) / config.rounds
        totals[2] += float(out.iou) / config.rounds
    if detached.grad is not None and embedding.requires_grad:
        embedding.backward(detached.grad)
    return totals[0], totals[1], totals[2], float(out.chosen_iou.mean())


def training_summary(result: TrainResult) -> dict[str, Any]:
    """The part of a model card that describes the run."""
    first = result.loss_history[0]["loss"] if result.loss_history else None
    last = result.loss_history[-1]["loss"] if result.loss_history else None
    return {
        "steps": result.steps,
        "images": result.images,
        "masks": result.masks,
        "left_out": result.skipped,
        "loss_first": first,
        "loss_last": last,
        "loss_history": result.loss_history,
        "workers": result.workers,
        "train_seconds": round(result.seconds, 1),
        "encode_seconds": round(result.cache_seconds, 1),
    }
