"""Run Meta's `segment-anything` 1.0 beside the engine, without torchvision.

Meta's package imports four torchvision symbols; this installs a pure-torch/PIL stand-in with
torchvision's CPU semantics (the parity fixture was made the same way). Only the benchmark uses it,
and only when `segment_anything` is importable (e.g. `pip install --no-deps --target DIR
segment-anything==1.0` and `--meta-path DIR`); the engine never depends on it.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch
from PIL import Image

from engine.amg_nms import nms


def _batched_nms(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    # one category in every call Meta makes; offset boxes per category like torchvision does
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _to_pil_image(array):
    return Image.fromarray(np.asarray(array))


def _resize(image, size):
    height, width = size
    return image.resize((width, height), Image.BILINEAR)


def install() -> None:
    """Register `torchvision`, `torchvision.ops(.boxes)`, `torchvision.transforms(.functional)`."""
    if "torchvision" in sys.modules:
        return
    root = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms, boxes.box_area = _batched_nms, _box_area
    ops.boxes = boxes
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize, functional.to_pil_image = _resize, _to_pil_image
    transforms.functional = functional
    root.ops, root.transforms = ops, transforms
    sys.modules.update(
        {
            "torchvision": root,
            "torchvision.ops": ops,
            "torchvision.ops.boxes": boxes,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )


def build_meta_sam(config_path, checkpoint):
    """Meta's Sam with the fixture's architecture (config.json keys = engine SamConfig fields)."""
    install()
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    from engine.model import resolve_config

    c, _ = resolve_config(config_path)
    grid = c.image_size // c.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c.encoder_depth,
            embed_dim=c.encoder_embed_dim,
            img_size=c.image_size,
            mlp_ratio=c.encoder_mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=c.encoder_layernorm_eps),
            num_heads=c.encoder_num_heads,
            patch_size=c.patch_size,
            qkv_bias=c.encoder_qkv_bias,
            use_rel_pos=c.encoder_use_rel_pos,
            use_abs_pos=c.encoder_use_abs_pos,
            global_attn_indexes=tuple(c.encoder_global_attn_indexes),
            window_size=c.window_size,
            out_chans=c.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(c.image_size, c.image_size),
            mask_in_chans=c.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=c.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=c.decoder_transformer_depth,
                embedding_dim=c.prompt_embed_dim,
                mlp_dim=c.decoder_transformer_mlp_dim,
                num_heads=c.decoder_transformer_num_heads,
            ),
            transformer_dim=c.prompt_embed_dim,
            iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
        ),
        pixel_mean=list(c.pixel_mean),
        pixel_std=list(c.pixel_std),
    )
    sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.eval()
