"""The Segment Anything model: an image encoder, a prompt encoder and a mask decoder, plus the
pre-processing (normalise, pad) and post-processing (upscale, crop, resize) around them."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from engine.mask_ops import MaskUpsampler
from engine.modeling.mask_decoder import MaskDecoder
from engine.modeling.prompt_encoder import PromptEncoder


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        img_size: int = 1024,
        mask_threshold: float = 0.0,
        image_format: str = "RGB",
    ) -> None:
        """
        Arguments:
          image_encoder (nn.Module): Bx3x(img_size)x(img_size) normalised images -> BxCxHxW embedding
            (any encoder: ViT, a light CNN...). It must match prompt_encoder.image_embedding_size.
          prompt_encoder (PromptEncoder): points, boxes and mask prompts to embeddings.
          mask_decoder (MaskDecoder): embeddings to mask logits and predicted IoU.
          pixel_mean, pixel_std (Sequence[float]): RGB normalisation in 0..255 units.
          img_size (int): side of the square encoder input (longest image side is resized to it).
          mask_threshold (float): logit threshold that binarises masks.
          image_format (str): channel order the model expects, "RGB" or "BGR".
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = img_size
        self.mask_threshold = mask_threshold
        self.image_format = image_format
        # Non-persistent: the official checkpoints do not hold them.
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction for a batch of images, each with its own prompts (Meta's interface).

        Arguments:
          batched_input (list[dict]): per image: "image" 3xHxW uint8/float tensor already resized so
            the longest side is img_size, "original_size" (H, W), and optionally "point_coords" BxNx2,
            "point_labels" BxN, "boxes" Bx4, "mask_inputs" Bx1x256x256, all in the resized frame.
          multimask_output (bool): return 3 masks per prompt instead of 1.
        Returns:
          (list[dict]): per image: "masks" BxKxHxW bool at original size, "iou_predictions" BxK,
            "low_res_logits" BxKx256x256.
        """
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points, record.get("boxes"), record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res, record["image"].shape[-2:], record["original_size"]
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a ...x3xhxw image (0..255) and zero-pad it bottom/right to img_size x img_size."""
        x = (x - self.pixel_mean) / self.pixel_std
        height, width = x.shape[-2:]
        return F.pad(x, (0, self.img_size - width, 0, self.img_size - height))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Sequence[int], original_size: Sequence[int]
    ) -> torch.Tensor:
        """Low-resolution logits BxKxhxw -> logits at the original image size BxKxHxW.

        Upscale to the padded input square, drop the padding, then resize to the original size
        (bilinear, align_corners=False, as the model was trained).
        """
        batch, k = masks.shape[:2]
        upsampler = MaskUpsampler(masks.shape[-2:], self.img_size, input_size, original_size)
        return upsampler.logits(masks.flatten(0, 1)).view(batch, k, *upsampler.original_size)
