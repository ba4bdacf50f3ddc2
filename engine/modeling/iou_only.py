"""Predicted IoUs alone, for many point prompts on one image: the generator's prefilter pass.

The mask decoder's cost per prompt is its image side: 4096 image tokens of width 256 that the
prompt's tokens update twice (the image->token attentions). Written as `MaskDecoder` computes
it, each update is followed by elementwise passes over all of them (bias, residual, positional
encoding sums), and those passes, not the matrix products, are most of the time on a CPU. This
pass computes the same function with them folded into matrix products:

- everything that depends only on the image (its tokens and their positional encoding, through
  the first block's projections and every later attention's key / query projection) is
  computed once per image (`IouContext`) instead of once per prompt;
- `(x + pe) W^T` is split into `x W^T` (per prompt) plus `pe W^T` (per image), so no
  `keys + pe` sum is ever formed;
- the image->token output bias passes into the value rows (each head's softmax sums to one) and
  the residual is the matrix product's accumulator, updated in place;
- the last token->image attention runs for the IoU token only (the masks are not needed),
  or for the output tokens when `rough_masks` also wants the masks.

The arithmetic is float32 in another order than Meta's: predicted IoUs differ by ~1e-6, far
inside the prefilter's margin (`engine.amg.PREFILTER_MARGIN`); the masks that are kept always
come from the exact decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.modeling.mask_decoder import MaskDecoder
from engine.modeling.transformer import Attention


@dataclass
class IouContext:
    """What the IoU pass needs of one image, computed once for all its prompts.

    Projections are per head: H x d x M (values H x M x d), d = I / H.

    Attributes:
      src (torch.Tensor): M x C image tokens (embedding + the no-mask dense prompt).
      first_k, first_v (torch.Tensor): the first block's token->image key / value projections
        of the (shared) image tokens.
      first_q (torch.Tensor): the first block's image->token query projection of them.
      pe_k (list[torch.Tensor]): per later block, its token->image key projection of the
        positional encoding (no bias); the last entry is the final attention's.
      pe_q (list[torch.Tensor]): per later block, its image->token query projection of the
        positional encoding (no bias).
    """

    src: torch.Tensor
    first_k: torch.Tensor
    first_v: torch.Tensor
    first_q: torch.Tensor
    pe_k: list[torch.Tensor]
    pe_q: list[torch.Tensor]


def supports(decoder: MaskDecoder) -> bool:
    """The pass knows SAM's layout: the first block without positional encodings, the others with."""
    layers = list(decoder.transformer.layers)
    return bool(layers) and layers[0].skip_first_layer_pe and not any(
        layer.skip_first_layer_pe for layer in layers[1:]
    )


@torch.no_grad()
def iou_context(
    decoder: MaskDecoder, image_embeddings: torch.Tensor, no_mask_dense: torch.Tensor, image_pe: torch.Tensor
) -> IouContext:
    """The per-image part of `iou_predictions` (1 x C x H x W embeddings, dense prompt and PE)."""
    transformer = decoder.transformer
    src = (image_embeddings + no_mask_dense).flatten(2)[0].t().contiguous()  # M x C
    pe = image_pe.flatten(2)[0].t().contiguous()
    first = transformer.layers[0]
    with_pe = src + pe
    later = list(transformer.layers[1:])
    t2i = [layer.cross_attn_token_to_image for layer in later] + [transformer.final_attn_token_to_image]
    i2t = [layer.cross_attn_image_to_token for layer in later]
    heads = first.cross_attn_token_to_image.num_heads

    def per_head(x: torch.Tensor) -> torch.Tensor:  # I x M -> H x d x M
        return x.reshape(heads, -1, x.shape[-1]).contiguous()

    return IouContext(
        src=src,
        first_k=per_head(first.cross_attn_token_to_image.k_proj(with_pe).t()),
        first_v=per_head(first.cross_attn_token_to_image.v_proj(src).t()).transpose(1, 2).contiguous(),
        first_q=per_head(first.cross_attn_image_to_token.q_proj(with_pe).t()),
        pe_k=[per_head(attn.k_proj.weight @ pe.t()) for attn in t2i],
        pe_q=[per_head(attn.q_proj.weight @ pe.t()) for attn in i2t],
    )


@torch.no_grad()
def iou_predictions(decoder: MaskDecoder, context: IouContext, sparse: torch.Tensor) -> torch.Tensor:
    """B x (1 + K) predicted IoUs of B prompts (sparse embeddings B x N x C), as
    `MaskDecoder.predict_masks` gives them (to ~1e-6), without any mask."""
    queries, keys, prompt = _transformer(decoder, context, sparse)
    iou_token = _final_tokens(decoder, context, queries, prompt, keys, slice(0, 1))[:, 0]
    return decoder.iou_prediction_head(iou_token)


@torch.no_grad()
def rough_masks(
    decoder: MaskDecoder,
    context: IouContext,
    sparse: torch.Tensor,
    size: tuple[int, int],
    min_iou: float | None,
    low_res_needed: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The IoU pass, then the multimask outputs' low-res logits of the prompts with a multimask
    IoU over `min_iou` (None: all), as `MaskDecoder.predict_masks` gives them (to ~2e-6 of 1 +
    the largest): the final attention of those mask tokens and the upscaling (the decoder's fused
    layer norm), only of the image pixels making the low-res `low_res_needed` (rows, cols) (each
    pixel's 4 x 4 logits depend on it alone; the others stay 0). The generator's stability
    prefilter bounds masks with them.

    Returns:
      (rows, logits, ious): the R prompts upscaled (indices into the batch, ascending), their
        R x (K - 1) x 4H x 4W logits, and the B x (1 + K) predicted IoUs of all B prompts.
    """
    queries, keys, prompt = _transformer(decoder, context, sparse)
    iou_token = _final_tokens(decoder, context, queries, prompt, keys, slice(0, 1))[:, 0]
    ious = decoder.iou_prediction_head(iou_token)
    batch = queries.shape[0]
    rows = torch.arange(batch, device=keys.device)
    if min_iou is not None:
        rows = (ious[:, 1:] > min_iou).any(1).nonzero()[:, 0]
    masks = keys.new_zeros(len(rows), decoder.num_mask_tokens - 1, 4 * size[0], 4 * size[1])
    if not len(rows):
        return rows, masks, ious
    multimask = slice(2, 1 + decoder.num_mask_tokens)  # token 0: IoU, 1: the single-mask output
    if len(rows) < batch:
        queries, prompt, keys = queries[rows], prompt[rows], keys[rows]
    tokens = _final_tokens(decoder, context, queries, prompt, keys, multimask)
    mlps = list(decoder.output_hypernetworks_mlps)[1:]
    hyper_in = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(mlps)], dim=1)
    height, width = size
    if low_res_needed is not None:
        height, width = (min(n, -(-int(m) // 4)) for n, m in zip(size, low_res_needed))
    image = keys.view(len(rows), size[0], size[1], -1)[:, :height, :width]
    part = decoder.upscale_masks(
        image.reshape(len(rows), height * width, -1),
        (height, width),
        hyper_in,
        fused_norm=True,
    )
    masks[:, :, : 4 * height, : 4 * width] = part
    return rows, masks, ious


def _transformer(
    decoder: MaskDecoder, context: IouContext, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-way blocks in the folded arithmetic: the tokens before the final attention
    (B x T x C), the image tokens (B x M x C) and the prompt tokens (their positional part)."""
    transformer = decoder.transformer
    prompt = decoder.prompt_tokens(sparse)  # B x N x C
    queries = prompt
    keys = None  # the image tokens: shared until the first image->token attention
    for i, layer in enumerate(transformer.layers):
        queries = layer.token_self_attention(queries, prompt)
        if keys is None:
            attn_out = _tokens_to_shared_image(
                layer.cross_attn_token_to_image, queries + prompt, context.first_k, context.first_v
            )
        else:
            attn_out = _tokens_to_image(
                layer.cross_attn_token_to_image, queries + prompt, keys, context.pe_k[i - 1]
            )
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        attention = layer.cross_attn_image_to_token
        shared = keys is None
        if shared:
            logits = _per_head(_heads(attention, attention.k_proj(queries + prompt)), context.first_q)
            keys = context.src.expand(queries.shape[0], -1, -1)
        else:
            logits = _image_logits(attention, queries + prompt, keys, context.pe_q[i - 1])
        keys = _add_image_update(attention, logits, queries, keys, in_place=not shared)
        keys = layer.norm4(keys)
    return queries, keys, prompt


def _final_tokens(
    decoder: MaskDecoder,
    context: IouContext,
    queries: torch.Tensor,
    prompt: torch.Tensor,
    keys: torch.Tensor,
    which: slice,
) -> torch.Tensor:
    """The final token->image attention and norm for the output tokens `which` only."""
    transformer = decoder.transformer
    out = queries[:, which]
    attn_out = _tokens_to_image(
        transformer.final_attn_token_to_image, out + prompt[:, which], keys, context.pe_k[-1]
    )
    return transformer.norm_final_attn(out + attn_out)


def _heads(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    """B x N x I projections -> B x H x N x d, scaled by 1/sqrt(d) (the attention's scale)."""
    batch, tokens, width = x.shape
    head_dim = width // attention.num_heads
    x = x.view(batch, tokens, attention.num_heads, head_dim).transpose(1, 2)
    return x / math.sqrt(head_dim)


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """B x H x N x d times a per-image H x d x M -> B x H x N x M, as one product per head
    (the batch folded into rows; a broadcast matmul would copy `w` B times)."""
    batch, heads, tokens, head_dim = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(heads, batch * tokens, head_dim), w)
    return out.view(heads, batch, tokens, -1).transpose(0, 1).contiguous()


def _weight(linear: torch.nn.Linear, heads: int) -> torch.Tensor:
    """A C -> I projection weight as H x d x C."""
    return linear.weight.view(heads, -1, linear.weight.shape[1])


def _tokens_to_shared_image(
    attention: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Token->image attention over one image's projected keys / values (per head), for B prompts."""
    qh = _heads(attention, attention.q_proj(q))  # B x H x N x d
    attn = _per_head(qh, keys).softmax(-1)  # B x H x N x M
    mixed = _per_head(attn, values)  # B x H x N x d
    return attention.out_proj(mixed.transpose(1, 2).flatten(2))


def _tokens_to_image(
    attention: Attention, q: torch.Tensor, keys: torch.Tensor, pe_k: torch.Tensor
) -> torch.Tensor:
    """Token->image attention with per-prompt image tokens `keys` (B x M x C) as keys (plus the
    positional encoding) and values; q: B x N x C. The key bias is constant along each softmax
    row and drops out; the value bias passes through (rows sum to one)."""
    heads = attention.num_heads
    batch, tokens, width = q.shape
    qh = _heads(attention, attention.q_proj(q))  # B x H x N x d
    reach = (qh @ _weight(attention.k_proj, heads)).view(batch, heads * tokens, width)
    from_pe = _per_head(qh, pe_k).view(batch, heads * tokens, -1)
    attn = torch.baddbmm(from_pe, reach, keys.transpose(1, 2)).softmax(-1)  # B x HN x M
    mixed = (attn @ keys).view(batch, heads, tokens, width)
    values = mixed @ _weight(attention.v_proj, heads).transpose(1, 2)  # B x H x N x d
    values = values + attention.v_proj.bias.view(heads, 1, -1)
    return attention.out_proj(values.transpose(1, 2).flatten(2))


def _image_logits(
    attention: Attention, k: torch.Tensor, image: torch.Tensor, pe_q: torch.Tensor
) -> torch.Tensor:
    """Image->token attention logits B x H x N x M: per-prompt image tokens (plus the positional
    encoding) as queries over the prompt's tokens `k` (B x N x C)."""
    heads = attention.num_heads
    batch, tokens, width = k.shape
    kh = _heads(attention, attention.k_proj(k))  # B x H x N x d
    reach = (kh @ _weight(attention.q_proj, heads)).view(batch, heads * tokens, width)
    offset = kh @ attention.q_proj.bias.view(heads, -1, 1)  # B x H x N x 1
    from_pe = _per_head(kh, pe_q) + offset
    logits = torch.baddbmm(from_pe.view(batch, heads * tokens, -1), reach, image.transpose(1, 2))
    return logits.view(batch, heads, tokens, -1)


def _add_image_update(
    attention: Attention, logits: torch.Tensor, v: torch.Tensor, image: torch.Tensor, in_place: bool
) -> torch.Tensor:
    """image + image->token attention output (softmax over each head's N tokens): the output
    projection is applied to the N value rows first, its bias spread over the H heads (their
    weights sum to H), and the residual is the product's accumulator: in place when `image` is
    per prompt, a fresh tensor when it is the shared one (the image's tokens expanded over the
    batch: for one prompt that view is not even strided 0, so it must not be told by strides)."""
    heads = attention.num_heads
    batch, _, tokens, image_tokens = logits.shape
    width = image.shape[-1]
    attn = logits.softmax(2).view(batch, heads * tokens, image_tokens).transpose(1, 2)  # B x M x HN
    vh = attention.v_proj(v).view(batch, tokens, heads, -1).transpose(1, 2)  # B x H x N x d
    out_weight = attention.out_proj.weight.view(width, heads, -1).permute(1, 2, 0)  # H x d x C
    projected = (vh @ out_weight).reshape(batch, heads * tokens, width)
    projected = projected + attention.out_proj.bias / heads
    if in_place:
        return image.baddbmm_(attn, projected)
    return torch.baddbmm(image, attn, projected)
