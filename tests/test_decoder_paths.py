"""The decoder's re-associated attention and matrix-product upscaling compute the same function as
the textbook forms (Meta's), over the shapes the engine uses: one click, a batch of grid points
sharing one image, per-image batches in training, and many clicks (where the fallback is taken)."""

import pytest
import torch

from engine.modeling.mask_decoder import MaskDecoder
from engine.modeling.transformer import Attention, TwoWayTransformer


def _close(a, b, scale=1.0):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 2e-5 * max(1.0, scale)


@pytest.mark.parametrize("prompts, tokens, shared", [(1, 7, True), (4, 7, True), (4, 7, False), (2, 20, False), (3, 40, True)])
def test_cross_attention_paths_equal_forward(prompts, tokens, shared):
    torch.manual_seed(0)
    attn = Attention(256, 8, downsample_rate=2)
    for p in attn.parameters():  # non-zero biases, so every bias term is exercised
        torch.nn.init.normal_(p, std=0.1)
    image = torch.randn(1 if shared else prompts, 4096, 256)
    few = torch.randn(prompts, tokens, 256)
    with torch.no_grad():
        _close(attn.tokens_to_image(few, image, image), attn(few, image, image))
        _close(attn.image_to_tokens(image, few, few), attn(image, few, few))


def test_upscale_masks_equals_transposed_convolutions_and_exact_mode_their_bits():
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=512)
    decoder = MaskDecoder(transformer_dim=256, transformer=transformer)
    for p in decoder.output_upscaling.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for batch in (1, 3, 4):
        tokens = torch.randn(batch, 64 * 64, 256)
        hyper = torch.randn(batch, 4, 32)
        with torch.no_grad():
            # Meta's code: a channels-last view of the tokens through the Sequential
            grid = tokens.transpose(1, 2).view(batch, 256, 64, 64)
            up = decoder.output_upscaling(grid)
            expected = (hyper @ up.view(batch, 32, -1)).view(batch, 4, 256, 256)
            got = decoder.upscale_masks(tokens, (64, 64), hyper)
            with decoder.attention_mode(reassociate=False):
                exact = decoder.upscale_masks(tokens, (64, 64), hyper)
        _close(got, expected, expected.abs().max().item())  # fused layer norm: ~1e-6 off
        # Meta's modules on row chunks: Meta's bits on any CPU
        assert torch.equal(exact, expected)


def test_upscale_masks_backpropagates():
    transformer = TwoWayTransformer(depth=1, embedding_dim=256, num_heads=8, mlp_dim=256)
    decoder = MaskDecoder(transformer_dim=256, transformer=transformer)
    tokens = torch.randn(2, 16 * 16, 256, requires_grad=True)
    decoder.upscale_masks(tokens, (16, 16), torch.randn(2, 4, 32)).sum().backward()
    assert tokens.grad is not None and decoder.output_upscaling[0].weight.grad is not None


def _decoder_and_prompts(prompts: int):
    """A small random decoder and `prompts` two-token prompts on one 16x16 image embedding."""
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=512)
    decoder = MaskDecoder(transformer_dim=256, transformer=transformer).eval()
    image, pe = torch.randn(1, 256, 16, 16), torch.randn(1, 256, 16, 16)
    dense = torch.randn(1, 256, 1, 1).expand(prompts, -1, 16, 16)
    return decoder, (image, pe, torch.randn(prompts, 2, 256), dense)


def test_min_iou_skips_only_the_masks_of_prompts_the_filter_drops():
    decoder, (image, pe, sparse, dense) = _decoder_and_prompts(6)
    with torch.no_grad():
        full, iou = decoder(image, pe, sparse, dense, multimask_output=True)
        threshold = float(iou.max(1).values.median())
        part, iou_part = decoder(image, pe, sparse, dense, multimask_output=True, min_iou=threshold)
    needed = (iou > threshold).any(1)
    assert 0 < int(needed.sum()) < 6 and torch.equal(iou, iou_part)
    _close(part[needed], full[needed], full.abs().max().item())
    assert not part[~needed].any()


def test_exact_mode_is_meta_arithmetic_and_fast_mode_is_close():
    """`attention_mode(reassociate=False)` runs `forward` everywhere (bit for bit the textbook
    form), and the attentions' setting comes back after the block."""
    decoder, (image, pe, sparse, dense) = _decoder_and_prompts(3)
    transformer = decoder.transformer
    calls = []
    with torch.no_grad():
        fast = decoder(image, pe, sparse, dense, multimask_output=True)
        with decoder.attention_mode(reassociate=False):
            exact = decoder(image, pe, sparse, dense, multimask_output=True)
            for module in transformer.modules():
                if isinstance(module, Attention):
                    module.register_forward_hook(lambda *a: calls.append(1))
            decoder(image, pe, sparse, dense, multimask_output=True)
    assert len(calls) == 2 * 3 + 1  # every attention went through forward
    _close(fast[1], exact[1])
    assert all(m.reassociate for m in transformer.modules() if isinstance(m, Attention))


@pytest.mark.parametrize(
    "depth, prompts, width, heads, tokens",
    [(2, 5, 256, 8, 3), (3, 2, 256, 8, 3), (2, 3, 128, 4, 2), (1, 4, 64, 2, 1)],
)
def test_iou_only_pass_equals_the_decoders_ious(depth, prompts, width, heads, tokens):
    """The generator's prefilter pass (per-image projections, PE folded into products, residuals
    as accumulators, the IoU token alone at the end) gives the decoder's IoUs: every bias and
    norm parameter non-trivial, SAM's depth and one more block, and decoders of other widths,
    heads, depths and multimask counts (a model of other dims than SAM's)."""
    from engine.modeling import iou_only

    torch.manual_seed(depth)
    transformer = TwoWayTransformer(depth=depth, embedding_dim=width, num_heads=heads, mlp_dim=2 * width)
    decoder = MaskDecoder(transformer_dim=width, transformer=transformer, num_multimask_outputs=tokens).eval()
    for name, p in decoder.named_parameters():
        if "norm" in name and name.endswith("weight"):
            torch.nn.init.uniform_(p, 0.5, 1.5)
        else:
            torch.nn.init.normal_(p, std=0.1 if p.ndim == 1 else 0.05)
    image, pe = torch.randn(1, width, 32, 32), torch.randn(1, width, 32, 32)
    no_mask = torch.randn(1, width, 1, 1)
    sparse = torch.randn(prompts, 2, width)
    assert iou_only.supports(decoder)
    with torch.no_grad(), decoder.attention_mode(reassociate=False):
        masks, expected = decoder.predict_masks(image, pe, sparse, no_mask.expand(prompts, -1, 32, 32))
        context = iou_only.iou_context(decoder, image, no_mask, pe)
        got = iou_only.iou_predictions(decoder, context, sparse)
        # the stability prefilter's rough masks: the multimask outputs, where the IoUs pass,
        # on the low-res part the generator reads (the rest 0)
        threshold = float(expected[:, 1:].median())
        rows, rough, rough_ious = iou_only.rough_masks(
            decoder, context, sparse, (32, 32), threshold, (70, 90)
        )
        # one prompt a call: the image's shared tokens, expanded over a batch of 1, are not a
        # stride-0 view; they must stay untouched for the crop's later calls
        src = context.src.clone()
        alone = [iou_only.iou_predictions(decoder, context, sparse[i : i + 1]) for i in range(prompts)]
        assert torch.equal(context.src, src)
        _close(torch.cat(alone), expected, expected.abs().max().item())
    _close(got, expected, expected.abs().max().item())
    _close(rough_ious, expected, expected.abs().max().item())
    passing = (rough_ious[:, 1:] > threshold).any(1)
    assert 0 < int(passing.sum()) <= prompts
    assert rows.tolist() == passing.nonzero()[:, 0].tolist()  # only those, in order
    scale = masks.abs().max().item()
    _close(rough[..., :72, :90], masks[passing, 1:][..., :72, :90], scale)  # (whole pixels: 72)
    assert not rough[..., 72:, :].any() and not rough[..., 92:].any()


def test_upscaling_only_the_rows_read_gives_their_bits():
    """`low_res_rows`: the generator's resizes read no logits of the padding below the image, so
    the exact upscaling runs only the row chunks making the rows read, each with its own shape:
    those rows are the full call's bits, the rest 0."""
    torch.manual_seed(1)
    transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=512)
    decoder = MaskDecoder(transformer_dim=256, transformer=transformer)
    for p in decoder.output_upscaling.parameters():
        torch.nn.init.normal_(p, std=0.1)
    tokens, hyper = torch.randn(4, 64 * 64, 256), torch.randn(4, 3, 32)
    with torch.no_grad(), decoder.attention_mode(reassociate=False):
        full = decoder.upscale_masks(tokens, (64, 64), hyper)
        chunk = 4 * (decoder.upscale_pixels // (4 * 64))  # low-res rows a chunk makes
        for rows in (1, 146, 150, 256):
            part = decoder.upscale_masks(tokens, (64, 64), hyper, low_res_rows=rows)
            assert torch.equal(part[:, :, :rows], full[:, :, :rows])
            assert not part[:, :, -(-rows // chunk) * chunk :].any()
