"""The SAM mask decoder: output tokens + prompt tokens through the two-way transformer, then masks
from a hypernetwork dot product with the upscaled image tokens, and one predicted IoU per mask."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from engine.modeling import batch_rows
from engine.modeling.common import LayerNorm2d
from engine.modeling.transformer import Attention


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        layernorm2d_eps: float = 1e-6,
    ) -> None:
        """
        Arguments:
          transformer_dim (int): token / image embedding width (256).
          transformer (nn.Module): the two-way transformer.
          num_multimask_outputs (int): masks returned when ambiguous (3); one more token makes the
            single-mask output.
          iou_head_depth, iou_head_hidden_dim: the MLP predicting each mask's IoU.
          layernorm2d_eps (float): eps of the LayerNorm2d inside the output upscaling.
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4, eps=layernorm2d_eps),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        # Embedding pixels upscaled at a time, over the whole batch: on 2048, Meta's modules took
        # 11.6 ms a prompt for 4 prompts against 13.0 ms on 512 and 24.4 ms on the whole 64x64,
        # the fused form 9.5 ms against 11.7 ms on 512 (2-core CPU); intermediates stay ~4 MiB.
        self.upscale_pixels = 2048
        # The upscaling's LayerNorm2d as one fused kernel (faster, ~1e-6 off) or in Meta's
        # arithmetic; `attention_mode` sets it with the attention's.
        self.fused_norm = True

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        min_iou: float | None = None,
        low_res_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          image_embeddings (torch.Tensor): 1xCxHxW (shared by every prompt) or BxCxHxW.
          image_pe (torch.Tensor): 1xCxHxW.
          sparse_prompt_embeddings (torch.Tensor): BxNxC.
          dense_prompt_embeddings (torch.Tensor): BxCxHxW.
          multimask_output (bool): return masks 1..3 (ambiguity-aware) instead of mask 0.
          min_iou (float | None): the automatic generator's predicted-IoU filter: the upscaling
            (a third of the decoder's work) runs only for prompts with a returned mask whose
            predicted IoU is > min_iou; the other prompts' logits are left at 0 (unused).
          low_res_rows (int | None): the generator's resizes read only the low-res rows of the
            image, not of the padding below it: only the upscaling's row chunks that make them
            run (the same chunks, so the same bits), the other rows are 0. None: all.
        Returns:
          (torch.Tensor): BxKx(4H)x(4W) mask logits, K = 3 or 1.
          (torch.Tensor): BxK predicted IoU (not squashed: may leave [0, 1]).
        """
        selected = slice(1, None) if multimask_output else slice(0, 1)
        needed = None
        if min_iou is not None:
            needed = lambda iou: (iou[:, selected] > min_iou).any(1)  # noqa: E731
        masks, iou_pred = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            needed,
            low_res_rows,
        )
        return masks[:, selected, :, :], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        needed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        low_res_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 1 + num_multimask_outputs masks and IoU predictions, token order [iou, masks, prompts].

        needed: from the Bx(1+K) predicted IoUs, the B bools of the prompts whose masks are
        computed (the others' stay 0); None computes all. low_res_rows: see `forward`."""
        tokens = self.prompt_tokens(sparse_prompt_embeddings)

        # One image embedding and one positional encoding serve every prompt. Without mask prompts
        # the dense embedding is one vector broadcast over the batch, so the image side enters the
        # transformer once (batch 1) and becomes per-prompt only where prompts make it differ
        # (after the first image->token attention); broadcasting replaces Meta's B copies.
        batch = tokens.shape[0]
        dense = dense_prompt_embeddings
        if image_embeddings.shape[0] == 1 and dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]
        src = image_embeddings + dense
        _, channels, height, width = src.shape

        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        iou_pred = self.iou_prediction_head(iou_token_out)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        src = src.expand(batch, -1, -1)
        if needed is None:
            return self.upscale_masks(src, (height, width), hyper_in, low_res_rows), iou_pred
        rows = needed(iou_pred).nonzero()[:, 0]
        masks = src.new_zeros(batch, hyper_in.shape[1], 4 * height, 4 * width)
        if len(rows):
            masks[rows] = self.upscale_masks(src[rows], (height, width), hyper_in[rows], low_res_rows)
        return masks, iou_pred

    def prompt_tokens(self, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """B x (1 + K + N) x C transformer tokens: IoU token, mask tokens, then the prompt's."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        return torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

    @contextlib.contextmanager
    def attention_mode(self, reassociate: bool) -> Iterator[None]:
        """Within the block, the fast arithmetic (re-associated cross-attention, the upscaling's
        fused layer norm; not bit-identical to Meta's) on or off; the settings in force before
        come back afterwards."""
        attentions = [m for m in self.transformer.modules() if isinstance(m, Attention)]
        attentions_before, fused_norm_before = [m.reassociate for m in attentions], self.fused_norm
        for module in attentions:
            module.reassociate = bool(reassociate)
        self.fused_norm = bool(reassociate)
        try:
            yield
        finally:
            for module, value in zip(attentions, attentions_before):
                module.reassociate = value
            self.fused_norm = fused_norm_before

    def upscale_masks(
        self,
        image_tokens: torch.Tensor | None,
        size: tuple[int, int],
        hyper_in: torch.Tensor,
        low_res_rows: int | None = None,
        fused_norm: bool | None = None,
        first_conv: Callable[[int, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`output_upscaling` then the hypernetwork product, on B x (H*W) x C image tokens, a few
        embedding rows at a time: every step is per pixel (a 2x2, stride-2 transposed convolution
        maps each input pixel to its own 2x2 output block), so a chunk's intermediates stay in
        the CPU's cache instead of being written to and read back from fresh memory.

        Exact mode (`fused_norm` False): Meta's own modules on Meta's channels-last view of the
        tokens, so Meta's kernels give Meta's bits on any CPU (a matrix-product form of the
        convolutions gave them on one CPU and was 6e-6 off on another). Fused mode: each
        convolution is one matrix product over the channel axis, computed channels-last
        straight from the token layout, and the layer norm one fused kernel (faster; ~1e-6 off).
        With `low_res_rows` only the chunks making the first that many rows run; the rows after
        them are 0. A chunk takes `upscale_pixels` embedding pixels over the whole batch.
        `fused_norm`: None: `self.fused_norm`. `first_conv` (fused mode): the first transposed
        convolution's output from the caller, `first_conv(start, stop)` -> B x (stop - start) x
        (2 * 2 * C/4) for the embedding pixels start:stop (row-major) in its matrix-product
        layout (then `image_tokens` is not read: pass None).
        Returns B x K x 4H x 4W.
        """
        batch = hyper_in.shape[0]
        height, width = size
        fused_norm = self.fused_norm if fused_norm is None else fused_norm
        k = hyper_in.shape[1]
        masks = hyper_in.new_empty(batch, k, 4 * height, 4 * width)
        rows = max(1, self.upscale_pixels // max(1, batch * width))
        stop = height if low_res_rows is None else min(height, -(-int(low_res_rows) // 4))
        stop = min(height, -(-stop // rows) * rows)  # whole chunks: each keeps its shape
        masks[:, :, 4 * stop :] = 0
        if not fused_norm:
            if first_conv is not None:
                raise ValueError("first_conv is the fused mode's matrix-product layout: pass fused_norm=True")
            if batch > 1 and image_tokens.stride(0) == 0:
                image_tokens = image_tokens.contiguous()  # Meta's are B copies, not a broadcast
            grid = image_tokens.transpose(1, 2).view(batch, -1, height, width)
            for top in range(0, stop, rows):
                fine = self.output_upscaling(grid[:, :, top : top + rows])
                part = (hyper_in @ fine.view(batch, fine.shape[1], -1)).view(batch, k, -1, 4 * width)
                masks[:, :, 4 * top : 4 * top + part.shape[2]] = part
            return masks
        up1, norm, act1, up2, act2 = self.output_upscaling

        def block_matmul(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
            out = F.linear(x, *transposed_conv_matrix(conv))
            return out.view(*out.shape[:-2], -1, conv.out_channels)

        tokens = None if first_conv is not None else image_tokens.reshape(batch, height, width, -1)
        for top in range(0, stop, rows):
            if first_conv is not None:
                part = first_conv(top * width, min(top + rows, stop) * width)
                mid = part.reshape(batch, -1, up1.out_channels)
            else:
                part = tokens[:, top : top + rows].reshape(batch, -1, up1.in_channels)
                mid = block_matmul(part, up1)  # B x 4P x C/4, pixel order (i, j, a, b)
            mid = act1(F.layer_norm(mid, (up1.out_channels,), norm.weight, norm.bias, norm.eps))
            fine = act2(block_matmul(mid, up2))  # B x 16P x C/8, order (i, j, a, b, a2, b2)
            part_masks = (fine @ hyper_in.transpose(1, 2)).view(batch, -1, width, 2, 2, 2, 2, k)
            # row = 4i + 2a + a2, column = 4j + 2b + b2
            part_masks = part_masks.permute(0, 7, 1, 3, 5, 2, 4, 6)
            n = part_masks.shape[2]
            masks[:, :, 4 * top : 4 * (top + n)] = part_masks.reshape(batch, k, 4 * n, 4 * width)
        return masks


def transposed_conv_matrix(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2, stride-2 transposed convolution as one matrix product per input pixel: (weight,
    bias) of shapes (2 * 2 * out) x in and (2 * 2 * out), output channels last per sub-pixel
    (`upscale_masks`'s fused layout, and that of its `first_conv`)."""
    weight = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.in_channels)  # (in x out x 2 x 2)
    return weight, conv.bias.repeat(4)


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (none after the last)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = batch_rows.linear(layer, x)  # one row per prompt (see batch_rows)
            x = x if i == last else F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
