"""Predicted IoUs alone, for many point prompts on one image: the generator's prefilter pass.

The mask decoder's cost per prompt is its image side: 4096 image tokens of width 256 that the
prompt's tokens update twice (the image->token attentions) and attend to three times. This pass
computes the same function without ever forming a prompt's image tokens:

- what depends only on the image (its tokens and their positional encoding through the first
  block's projections and every later attention's positional part) is computed once per image
  (`IouContext`);
- after the first block the image tokens are the image's plus low-rank updates, layer-normed;
  they are kept factored (`engine.modeling.factored_tokens`), so each attention's products with
  them cost 4096 x (heads x tokens) per update instead of 4096 x 256 per prompt;
- `(x + pe) W^T` is split into `x W^T` (per prompt) plus `pe W^T` (per image), so no
  `keys + pe` sum is ever formed;
- the last token->image attention runs for the IoU token only (the masks are not needed),
  or for the output tokens when `rough_masks` also wants the masks; their upscaling starts from
  the factored tokens' product with the first transposed convolution.

The arithmetic is float32 in another order than Meta's: predicted IoUs differ by ~1e-6, far
inside the prefilter's margin (`engine.amg.PREFILTER_MARGIN`); the masks that are kept always
come from the exact decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.modeling.factored_tokens import FactoredTokens, SharedImage, Update
from engine.modeling.mask_decoder import MaskDecoder, transposed_conv_matrix
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
        positional encoding (no bias), H x (d + 1) x M: the last row ones (for the bias).
      image (SharedImage): `src` with its products by the decoder's weights, made on first use.
    """

    src: torch.Tensor
    first_k: torch.Tensor
    first_v: torch.Tensor
    first_q: torch.Tensor
    pe_k: list[torch.Tensor]
    pe_q: list[torch.Tensor]
    image: SharedImage = field(init=False)

    def __post_init__(self) -> None:
        self.image = SharedImage(self.src)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """H x d x M -> H x (d + 1) x M, the last row ones."""
    return torch.cat([x, x.new_ones(x.shape[0], 1, x.shape[2])], dim=1)


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
        pe_q=[_with_ones(per_head(attn.q_proj.weight @ pe.t())) for attn in i2t],
    )


@torch.no_grad()
def iou_predictions(decoder: MaskDecoder, context: IouContext, sparse: torch.Tensor) -> torch.Tensor:
    """B x (1 + K) predicted IoUs of B prompts (sparse embeddings B x N x C), as
    `MaskDecoder.predict_masks` gives them (to ~1e-6), without any mask."""
    queries, tokens, prompt = _transformer(decoder, context, sparse)
    iou_token = _final_tokens(decoder, context, queries, prompt, tokens, slice(0, 1))[:, 0]
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
    queries, tokens, prompt = _transformer(decoder, context, sparse)
    iou_token = _final_tokens(decoder, context, queries, prompt, tokens, slice(0, 1))[:, 0]
    ious = decoder.iou_prediction_head(iou_token)
    batch = queries.shape[0]
    rows = torch.arange(batch, device=queries.device)
    if min_iou is not None:
        rows = (ious[:, 1:] > min_iou).any(1).nonzero()[:, 0]
    masks = queries.new_zeros(len(rows), decoder.num_mask_tokens - 1, 4 * size[0], 4 * size[1])
    if not len(rows):
        return rows, masks, ious
    multimask = slice(2, 1 + decoder.num_mask_tokens)  # token 0: IoU, 1: the single-mask output
    if len(rows) < batch:
        queries, prompt, tokens = queries[rows], prompt[rows], tokens.select(rows)
    out = _final_tokens(decoder, context, queries, prompt, tokens, multimask)
    mlps = list(decoder.output_hypernetworks_mlps)[1:]
    hyper_in = torch.stack([mlp(out[:, i]) for i, mlp in enumerate(mlps)], dim=1)
    height, width = size
    if low_res_needed is not None:
        height, width = (min(n, -(-int(m) // 4)) for n, m in zip(size, low_res_needed))
    pixels = None  # the image tokens upscaled, row-major: all, or the first rows' first columns
    if width < size[1]:
        pixels = (torch.arange(height)[:, None] * size[1] + torch.arange(width)).flatten().to(queries.device)
    weight, bias = transposed_conv_matrix(decoder.output_upscaling[0])
    first = tokens.pixels_product(("upscaling",), weight.t(), bias, pixels)
    masks[:, :, : 4 * height, : 4 * width] = decoder.upscale_masks(
        None, (height, width), hyper_in, fused_norm=True, first_conv=first
    )
    return rows, masks, ious


def _transformer(
    decoder: MaskDecoder, context: IouContext, sparse: torch.Tensor
) -> tuple[torch.Tensor, FactoredTokens, torch.Tensor]:
    """The two-way blocks: the tokens before the final attention (B x T x C), the image tokens
    (factored) and the prompt tokens (their positional part)."""
    transformer = decoder.transformer
    prompt = decoder.prompt_tokens(sparse)  # B x N x C
    queries = prompt
    tokens = None  # the image tokens: shared until the first image->token attention
    for i, layer in enumerate(transformer.layers):
        queries = layer.token_self_attention(queries, prompt)
        if tokens is None:
            attn_out = _tokens_to_shared_image(
                layer.cross_attn_token_to_image, queries + prompt, context.first_k, context.first_v
            )
        else:
            attn_out = _tokens_to_image(
                layer.cross_attn_token_to_image, queries + prompt, tokens, context.pe_k[i - 1], ("t2i", i)
            )
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        attention = layer.cross_attn_image_to_token
        kh = _heads(attention, attention.k_proj(queries + prompt))  # B x H x N x d
        if tokens is None:
            logits = _per_head(kh, context.first_q)  # B x H x N x M
            tokens = FactoredTokens(context.image, queries.shape[0])
        else:
            logits = _image_logits(attention, kh, tokens, context.pe_q[i - 1], ("i2t", i))
        update = _image_update(attention, logits, queries, layer.norm4, ("i2t-out", i))
        tokens = tokens.add(update, layer.norm4.eps)
    return queries, tokens, prompt


def _final_tokens(
    decoder: MaskDecoder,
    context: IouContext,
    queries: torch.Tensor,
    prompt: torch.Tensor,
    tokens: FactoredTokens,
    which: slice,
) -> torch.Tensor:
    """The final token->image attention and norm for the output tokens `which` only."""
    transformer = decoder.transformer
    out = queries[:, which]
    attn_out = _tokens_to_image(
        transformer.final_attn_token_to_image, out + prompt[:, which], tokens, context.pe_k[-1], ("final",)
    )
    return transformer.norm_final_attn(out + attn_out)


def _heads(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    """B x N x I projections -> B x H x N x d, scaled by 1/sqrt(d) (the attention's scale)."""
    batch, tokens, width = x.shape
    head_dim = width // attention.num_heads
    x = x.view(batch, tokens, attention.num_heads, head_dim).transpose(1, 2)
    return x / math.sqrt(head_dim)


def _per_head(x: torch.Tensor, w: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
    """B x H x N x d times a per-image H x d x M -> B x H x N x M, as one product per head
    (the batch folded into rows; a broadcast matmul would copy `w` B times). `contiguous`
    False: a strided view (for a sum that reads it once)."""
    batch, heads, tokens, head_dim = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(heads, batch * tokens, head_dim), w)
    out = out.view(heads, batch, tokens, -1).transpose(0, 1)
    return out.contiguous() if contiguous else out


def _tokens_to_shared_image(
    attention: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Token->image attention over one image's projected keys / values (per head), for B prompts."""
    qh = _heads(attention, attention.q_proj(q))  # B x H x N x d
    attn = _per_head(qh, keys).softmax(-1)  # B x H x N x M
    mixed = _per_head(attn, values)  # B x H x N x d
    return attention.out_proj(mixed.transpose(1, 2).flatten(2))


def _tokens_to_image(
    attention: Attention, q: torch.Tensor, tokens: FactoredTokens, pe_k: torch.Tensor, key: tuple
) -> torch.Tensor:
    """Token->image attention with the per-prompt image tokens (plus the positional encoding)
    as keys and values; q: B x N x C. The key bias is constant along each softmax row and
    drops out; the value bias passes through (rows sum to one)."""
    heads = attention.num_heads
    batch, count, _ = q.shape
    qh = _heads(attention, attention.q_proj(q))  # B x H x N x d
    logits = tokens.times(key + ("k",), attention.k_proj.weight.t(), qh.transpose(2, 3))  # B x HN x M
    logits = logits.view(batch, heads, count, -1).add_(_per_head(qh, pe_k, contiguous=False))
    mixed = tokens.left(logits.softmax(-1), key + ("v",), attention.v_proj.weight.t())  # B x H x N x d
    mixed = mixed + attention.v_proj.bias.view(heads, 1, -1)
    return attention.out_proj(mixed.transpose(1, 2).flatten(2))


def _image_logits(
    attention: Attention, kh: torch.Tensor, tokens: FactoredTokens, pe_q: torch.Tensor, key: tuple
) -> torch.Tensor:
    """Image->token attention logits B x H x N x M: the per-prompt image tokens (plus the
    positional encoding) as queries over the prompt's tokens (keys `kh`, B x H x N x d)."""
    batch, heads, count, _ = kh.shape
    logits = tokens.times(key + ("q",), attention.q_proj.weight.t(), kh.transpose(2, 3))  # B x HN x M
    offset = kh @ attention.q_proj.bias.view(heads, -1, 1)  # B x H x N x 1: the query bias
    # (pe_q's last row is ones: the bias rides along in the positional product)
    from_pe = _per_head(torch.cat([kh, offset], dim=-1), pe_q, contiguous=False)
    return logits.view(batch, heads, count, -1).add_(from_pe)


def _image_update(
    attention: Attention, logits: torch.Tensor, v: torch.Tensor, norm: torch.nn.LayerNorm, key: tuple
) -> Update:
    """The image->token attention's update of the image tokens (softmax over each head's N
    tokens of `logits`, B x H x N x M) and the layer norm after it: the output projection is
    applied to the N value rows, its bias spread over the H heads (their weights sum to H)."""
    heads = attention.num_heads
    batch, _, tokens, image_tokens = logits.shape
    width = attention.out_proj.weight.shape[0]
    attn = logits.softmax(2).view(batch, heads * tokens, image_tokens)  # B x HN x M
    vh = attention.v_proj(v).view(batch, tokens, heads, -1).transpose(1, 2)  # B x H x N x d
    out_weight = attention.out_proj.weight  # C x (H d)
    per_head = out_weight.view(width, heads, -1).permute(1, 2, 0)  # H x d x C
    projected = (vh @ per_head).reshape(batch, heads * tokens, width)
    projected = projected + attention.out_proj.bias / heads
    return Update(
        attn=attn,
        values=projected,
        vh=vh,
        out_weight=out_weight,
        out_bias=attention.out_proj.bias,
        out_key=key,
        gamma=norm.weight,
        beta=norm.bias,
    )
