"""The SAM prompt encoder: points and box corners to sparse tokens, a mask prompt to a dense map.

Coordinates are encoded with random Fourier features (a fixed Gaussian projection), then the learned
type embedding is added: background point, foreground point, box top-left, box bottom-right, and
`not_a_point_embed` for the padding point added when there is no box.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.modeling import batch_rows
from engine.modeling.common import LayerNorm2d


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        """
        Arguments:
          embed_dim (int): prompt embedding dim (256).
          image_embedding_size (tuple[int, int]): (H, W) of the image embedding (64, 64).
          input_image_size (tuple[int, int]): (H, W) of the padded encoder input (1024, 1024).
          mask_in_chans (int): hidden channels of the mask-prompt downscaling convolutions.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell: 1xCxHxW."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          points (tuple | None): BxNx2 coordinates (x, y, input frame) and BxN labels
            (1 foreground, 0 background, -1 padding).
          boxes (torch.Tensor | None): Bx4 (or Bx1x4) boxes, XYXY, input frame.
          masks (torch.Tensor | None): Bx1xHmxWm low-resolution mask logits (Hm = 4 * embedding H).
        Returns:
          (torch.Tensor): BxKxC sparse embeddings (K = number of points + 2 per box).
          (torch.Tensor): BxCxHxW dense embeddings.
        """
        batch = self._batch_size(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        sparse = torch.empty((batch, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat(
                [sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1
            )
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            height, width = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        return sparse, dense

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5  # pixel centres
        if pad:
            # Without a box the decoder was trained with one extra "not a point" token.
            pad_coords = torch.zeros((coords.shape[0], 1, 2), device=coords.device)
            pad_labels = -torch.ones((labels.shape[0], 1), device=labels.device)
            coords = torch.cat([coords, pad_coords], dim=1)
            labels = torch.cat([labels, pad_labels], dim=1)
        embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        embedding[labels == -1] = 0.0
        embedding[labels == -1] += self.not_a_point_embed.weight
        embedding[labels == 0] += self.point_embeddings[0].weight
        embedding[labels == 1] += self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        embedding[:, 0, :] += self.point_embeddings[2].weight
        embedding[:, 1, :] += self.point_embeddings[3].weight
        return embedding

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates: [sin, cos] of a Gaussian projection."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords: torch.Tensor, prompt_side: bool = False) -> torch.Tensor:
        """...x2 coordinates in [0, 1] -> ...x(2*num_pos_feats). `prompt_side`: B x N x 2 prompt
        coordinates, whose projection `batch_rows` may compute at another batch's size."""
        coords = 2 * coords - 1
        matrix = self.positional_encoding_gaussian_matrix
        if prompt_side:
            key = ("projection", tuple(matrix.shape), matrix.dtype, str(matrix.device))
            coords = batch_rows.rowwise(lambda c: c @ matrix, coords, key)
        else:
            coords = coords @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an HxW grid: CxHxW."""
        height, width = size
        device = self.positional_encoding_gaussian_matrix.device
        ones = torch.ones((height, width), device=device, dtype=torch.float32)
        y = (ones.cumsum(dim=0) - 0.5) / height
        x = (ones.cumsum(dim=1) - 0.5) / width
        return self._encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """BxNx2 pixel coordinates (x, y) of an image of `image_size` (H, W) -> BxNxC.

        Normalisation runs in the input's dtype (float64 on the automatic-generator path) and the
        cast to float32 happens just before the projection, as in Meta's implementation.
        """
        coords = coords.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._encode(coords.to(torch.float), prompt_side=True)
