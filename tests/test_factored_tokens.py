"""The factored image tokens (`engine.modeling.factored_tokens`) are the written-out tokens: every
product the IoU pass takes of them, and the layer norms' statistics, over one to three updates."""

import pytest
import torch
from torch.nn import functional as F

from engine.modeling.factored_tokens import FactoredTokens, SharedImage, Update

M, C, H, D, N, B = 48, 24, 4, 3, 5, 3  # image tokens, width, heads, head width, tokens, prompts


def _updates(depth: int, generator: torch.Generator) -> list[Update]:
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    updates = []
    for level in range(depth):
        logits = randn(B, H, N, M, scale=2.0)
        updates.append(
            Update(
                attn=logits.softmax(2).reshape(B, H * N, M),  # each head's softmax over its N tokens
                values=None,
                vh=randn(B, H, N, D),
                out_weight=randn(C, H * D, scale=0.5),
                out_bias=randn(C),
                out_key=("out", level),
                gamma=1 + randn(C, scale=0.3),
                beta=randn(C, scale=0.3),
            )
        )
    for u in updates:  # the values rows: vh through the output projection, its bias over the heads
        u.values = (u.vh @ u.out_weight.view(C, H, D).permute(1, 2, 0)).reshape(B, H * N, C) + u.out_bias / H
    return updates


def _written_out(image: torch.Tensor, updates: list[Update], eps: float) -> torch.Tensor:
    tokens = image.expand(B, -1, -1)
    for u in updates:
        tokens = F.layer_norm(tokens + u.attn.transpose(1, 2) @ u.values, (C,), u.gamma, u.beta, eps)
    return tokens


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_factored_tokens_give_the_written_out_tokens_products(depth):
    generator = torch.Generator().manual_seed(depth)
    image = torch.randn(M, C, generator=generator, dtype=torch.float64) * 2 + 0.5
    updates = _updates(depth, generator)
    eps = 1e-5
    expected = _written_out(image, updates, eps)  # B x M x C
    tokens = FactoredTokens(SharedImage(image), B)
    for u in updates:
        tokens = tokens.add(u, eps)
    for u, mean in zip(updates, _means(image, updates, eps)):
        assert torch.allclose(u.mean, mean, atol=1e-10)  # the layer norms' statistics

    weight = torch.randn(C, H * D, generator=generator, dtype=torch.float64)
    z = torch.randn(B, H, D, 2, generator=generator, dtype=torch.float64)
    kw = (expected @ weight).view(B, M, H, D)
    product = torch.einsum("bmhd,bhdn->bhnm", kw, z).reshape(B, H * 2, M)
    assert torch.allclose(tokens.times(("w",), weight, z), product, atol=1e-9)

    attn = torch.randn(B, H, 2, M, generator=generator, dtype=torch.float64).softmax(-1)
    mixed = torch.einsum("bhnm,bmhd->bhnd", attn, kw)
    assert torch.allclose(tokens.left(attn, ("w",), weight), mixed, atol=1e-9)

    bias = torch.randn(H * D, generator=generator, dtype=torch.float64)
    part = tokens.pixels_product(("w",), weight, bias)
    assert torch.allclose(part(5, 17), expected[:, 5:17] @ weight + bias, atol=1e-9)
    pixels = torch.tensor([0, 3, 4, 40, 47])
    part = tokens.pixels_product(("w",), weight, bias, pixels)
    assert torch.allclose(part(1, 4), expected[:, pixels[1:4]] @ weight + bias, atol=1e-9)

    some = torch.tensor([2, 0])
    assert torch.allclose(tokens.select(some).times(("w",), weight, z[some]), product[some], atol=1e-9)


def _means(image: torch.Tensor, updates: list[Update], eps: float) -> list[torch.Tensor]:
    means, tokens = [], image.expand(B, -1, -1)
    for u in updates:
        x = tokens + u.attn.transpose(1, 2) @ u.values
        means.append(x.mean(-1))
        tokens = F.layer_norm(x, (C,), u.gamma, u.beta, eps)
    return means
