"""A batch of prompts' image tokens kept as the image's shared tokens plus low-rank updates.

In the mask decoder's two-way blocks, the image->token attention adds to the M (4096) image
tokens an update `A U` of rank at most heads x tokens (56 for one click: A is M x R softmax
weights, U the R x C projected values), then a layer norm. Written out per prompt, each later
product with the tokens costs M x C x R; kept factored,

    K_0 = S                                         (the image's M x C tokens, shared)
    K_l = diag(r_l) (K_{l-1} + A_l U_l - mu_l 1^T) diag(gamma_l) + 1 beta_l^T,

a product `K W Z` with a shared C x p matrix W (a projection weight) and a small per-prompt Z
costs `S W` once per image and M x k x |Z| per prompt, k = R + 2 per block so far (116 after
SAM's two, against C = 256); the layer norms' row statistics (`mu`, `r`) come from the same
products and R x R Gram matrices of the updates. The decoder's
cross-attentions never need the tokens themselves, only such products, so the M x C tensors
are never formed (the generator's rough pass; `engine.modeling.iou_only`).

The arithmetic is float32 in another order than the decoder's: results differ by ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

Key = tuple


class SharedImage:
    """K_0: one image's M x C tokens, with their products by shared matrices cached under a key
    (the caller's name for the matrix: products are computed once per image)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self._products: dict[Key, torch.Tensor] = {}

    def product(
        self, key: Key, weight: torch.Tensor, heads: int | None = None, major: str = "columns"
    ) -> torch.Tensor:
        """S @ weight, cached under `key`: transposed, p x M, or with `heads`, H x (p / H) x M;
        `major` "pixels": M x p."""
        key = key + (heads, major)
        if key not in self._products:
            out = self.tokens @ weight
            if major != "pixels":
                out = out.t()
                if heads is not None:
                    out = out.reshape(heads, -1, out.shape[-1])
            self._products[key] = out.contiguous()
        return self._products[key]

    def weighted_norms(self, key: Key, weight: torch.Tensor) -> torch.Tensor:
        """Row sums of weight * S^2 (M), cached under `key`."""
        key = ("norm2",) + key
        if key not in self._products:
            self._products[key] = self.tokens.square() @ weight
        return self._products[key]


@dataclass
class Update:
    """One block's image->token update of a batch of B prompts and the layer norm after it.

    Attributes:
      attn: B x R x M softmax weights, transposed (R = heads x tokens; `A` is its transpose).
      values: B x R x C, row (h, n) = vh[h, n] @ out_weight[:, h]^T + out_bias / H.
      vh: B x H x n x d per-head value vectors (so `values^T` = out_weight blockdiag(vh^T) +
        out_bias 1^T / H, with a shared out_weight).
      out_weight: C x (H d) output projection; out_key: its key in the image's cache.
      out_bias: C.
      gamma, beta: C, the layer norm's; mean, rstd: B x M, its row statistics.
    """

    attn: torch.Tensor
    values: torch.Tensor
    vh: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    out_key: Key
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor | None = None
    rstd: torch.Tensor | None = None


def _span(pixels: torch.Tensor | None, start: int, stop: int) -> slice | torch.Tensor:
    return slice(start, stop) if pixels is None else pixels[start:stop]


def _heads_times(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """z: B x H x d x n, x: (B or 1) x R x (H d) -> B x (H n) x R: Z^T x^T, each head's d x n
    block of z with that head's d columns of x."""
    batch, heads, head_dim, n = z.shape
    xh = x.view(x.shape[0], x.shape[1], heads, head_dim).permute(0, 2, 3, 1)  # B x H x d x R
    return (z.transpose(2, 3) @ xh).reshape(batch, heads * n, x.shape[1])


@dataclass
class _Flat:
    """K_l = diag(scale) S diag(gain) + right^T coeffs: the updates so far, multiplied out.

    scale: B x M (None: ones), gain: C (None: ones), right: B x k x M and coeffs: B x k x C
    (None: k = 0). Each update adds R + 2 rows (its softmax weights, the mean, the bias)."""

    scale: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    right: torch.Tensor | None = None
    coeffs: torch.Tensor | None = None

    def then(self, u: Update) -> "_Flat":
        r = u.rstd
        batch, tokens = r.shape
        rows, width = u.attn.shape[1], u.values.shape[2]
        old = 0 if self.right is None else self.right.shape[1]
        right = r.new_empty(batch, old + rows + 2, tokens)  # each block written once, scaled
        coeffs = r.new_empty(batch, old + rows + 2, width)
        if old:
            torch.mul(self.right, r[:, None], out=right[:, :old])
            torch.mul(self.coeffs, u.gamma, out=coeffs[:, :old])
        torch.mul(u.attn, r[:, None], out=right[:, old : old + rows])
        torch.mul(u.values, u.gamma, out=coeffs[:, old : old + rows])
        torch.mul(r, u.mean, out=right[:, -2]).neg_()
        right[:, -1] = 1.0
        coeffs[:, -2], coeffs[:, -1] = u.gamma, u.beta
        return _Flat(
            scale=r if self.scale is None else self.scale * r,
            gain=u.gamma if self.gain is None else self.gain * u.gamma,
            right=right,
            coeffs=coeffs,
        )

    def select(self, prompts: torch.Tensor) -> "_Flat":
        if self.right is None:
            return self
        return _Flat(self.scale[prompts], self.gain, self.right[prompts], self.coeffs[prompts])


class FactoredTokens:
    """K_L for a batch of prompts: the shared image and the L updates so far (see the module).

    Each level is kept both as its updates (for the layer norms' statistics, which use the
    updates' structure: their rows are per-prompt combinations of shared weights) and
    multiplied out (`_Flat`, for products: one matrix product over all the updates' rows).
    Products with the attentions come transposed (image tokens last), their softmaxes' layout."""

    def __init__(
        self,
        image: SharedImage,
        batch: int,
        updates: list[Update] | None = None,
        flats: list[_Flat] | None = None,
    ) -> None:
        self.image = image
        self.batch = batch
        self.updates = list(updates or [])
        self.flats = list(flats or [_Flat()])

    def add(self, update: Update, eps: float) -> "FactoredTokens":
        """K_{L+1} = LayerNorm(K_L + A U): `update` with its row statistics."""
        level = len(self.updates)
        width = self.image.tokens.shape[1]
        ones = torch.ones_like(update.gamma)
        total = self._x_dot(level, update, ("mean", level), ones)
        squares = self._x_norm2(level, update, ("var", level), ones)
        mean = total / width
        var = (squares / width - mean.square()).clamp_min(0.0)
        update.mean, update.rstd = mean, torch.rsqrt(var + eps)
        flats = self.flats + [self.flats[-1].then(update)]
        return FactoredTokens(self.image, self.batch, self.updates + [update], flats)

    def select(self, prompts: torch.Tensor) -> "FactoredTokens":
        """The same tokens for the prompts `prompts` (an index into the batch) only."""
        updates = [
            replace(
                u,
                attn=u.attn[prompts],
                values=u.values[prompts],
                vh=u.vh[prompts],
                mean=u.mean[prompts],
                rstd=u.rstd[prompts],
            )
            for u in self.updates
        ]
        flats = [flat.select(prompts) for flat in self.flats]
        return FactoredTokens(self.image, len(prompts), updates, flats)

    # -- products ------------------------------------------------------------------------------

    def times(self, key: Key, weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(K W Z)^T, B x (H n) x M, with W = `weight` (C x H d, shared; cached as `key`) and Z =
        `z` (B x H x d x n, each head's block)."""
        return self._times(len(self.updates), key, weight, z)

    def pixels_product(
        self, key: Key, weight: torch.Tensor, bias: torch.Tensor, pixels: torch.Tensor | None = None
    ) -> Callable[[int, int], torch.Tensor]:
        """K W + bias on the image tokens, pixel-major, a range of them at a time (so a consumer
        working in chunks keeps them in cache): returns `part(start, stop)` -> B x (stop - start)
        x p, the image tokens `pixels[start:stop]` (`pixels`: an index into M; None: all)."""
        flat = self.flats[-1]
        shared = self._shared(len(self.updates), key, weight, major="pixels")  # M x p
        if flat.right is None:
            return lambda start, stop: (shared[_span(pixels, start, stop)] + bias).expand(self.batch, -1, -1)
        small = flat.coeffs @ weight  # B x k x p
        small[:, -1] += bias  # (the last right row is ones)

        def part(start: int, stop: int) -> torch.Tensor:
            span = _span(pixels, start, stop)
            out = shared[span] * flat.scale[:, span, None]
            return out.baddbmm_(flat.right[:, :, span].transpose(1, 2), small)

        return part

    def _times(self, level: int, key: Key, weight: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """(K_level W Z)^T as `times`; z None: (K_level W)^T, B x p x M."""
        flat = self.flats[level]
        if z is None:
            shared = self._shared(level, key, weight)  # p x M
            if flat.right is None:
                return shared.expand(self.batch, -1, -1)
            out = shared * flat.scale[:, None]
            return out.baddbmm_((flat.coeffs @ weight).transpose(1, 2), flat.right)
        batch, heads, head_dim, n = z.shape
        shared = self._shared(level, key, weight, heads)  # H x d x M
        per_head = torch.bmm(z.permute(1, 0, 3, 2).reshape(heads, batch * n, head_dim), shared)
        per_head = per_head.view(heads, batch, n, -1).transpose(0, 1)  # B x H x n x M (strided)
        out = torch.empty(batch, heads, n, per_head.shape[-1], dtype=per_head.dtype, device=per_head.device)
        if flat.right is None:
            out.copy_(per_head)
        else:
            torch.mul(per_head, flat.scale[:, None, None], out=out)
        out = out.view(batch, heads * n, -1)
        if flat.right is None:
            return out
        return out.baddbmm_(_heads_times(z, flat.coeffs @ weight), flat.right)

    def _shared(
        self, level: int, key: Key, weight: torch.Tensor, heads: int | None = None, major: str = "columns"
    ) -> torch.Tensor:
        """The shared part's product S diag(gain) W at `level` (`SharedImage.product`'s layouts),
        cached per image under `key` and the level."""
        gain = self.flats[level].gain
        scaled = weight if gain is None else gain[:, None] * weight
        return self.image.product(key + ("level", level), scaled, heads, major)

    def left(self, attn: torch.Tensor, key: Key, weight: torch.Tensor) -> torch.Tensor:
        """attn_h K W_h per head: attn B x H x n x M, W = `weight` C x (H d) (cached as `key`)
        -> B x H x n x d."""
        batch, heads, n, tokens = attn.shape
        head_dim = weight.shape[1] // heads
        flat = self.flats[-1]
        shared = self._shared(len(self.updates), key, weight, heads)  # H x d x M
        weighted = attn if flat.right is None else attn * flat.scale[:, None, None]
        per_head = weighted.transpose(0, 1).reshape(heads, batch * n, tokens)
        out = torch.bmm(per_head, shared.transpose(1, 2)).view(heads, batch, n, head_dim).transpose(0, 1)
        if flat.right is None:
            return out
        mixed = attn.reshape(batch, heads * n, tokens) @ flat.right.transpose(1, 2)  # B x Hn x k
        small = (mixed @ (flat.coeffs @ weight)).view(batch, heads, n, heads, head_dim)
        return out + torch.diagonal(small, dim1=1, dim2=3).permute(0, 3, 1, 2)

    # -- row statistics ------------------------------------------------------------------------

    def _dot(self, level: int, key: Key, vector: torch.Tensor) -> torch.Tensor:
        """K_level v (B x M)."""
        return self._times(level, key, vector[:, None], None)[:, 0]

    def _x_dot(self, level: int, u: Update, key: Key, vector: torch.Tensor) -> torch.Tensor:
        """(K_level + A U) v (B x M)."""
        return self._dot(level, key, vector) + ((u.values @ vector)[:, None, :] @ u.attn)[:, 0]

    def _x_norm2(self, level: int, u: Update, key: Key, weight: torch.Tensor) -> torch.Tensor:
        """Row sums of weight * (K_level + A U)^2 (B x M)."""
        vh_t = u.vh.transpose(2, 3)  # B x H x d x n
        # (K diag(w) U^T)^T = (K (w * out_weight) blockdiag(vh^T))^T + 1 (K (w * out_bias / H))^T
        cross = self._times(level, key + ("out",) + u.out_key, weight[:, None] * u.out_weight, vh_t)
        # (each head's softmax weights sum to one: the bias rows add H times K (w * out_bias / H))
        bias = self._dot(level, key + ("bias",) + u.out_key, weight * u.out_bias)
        gram = (u.values * weight) @ u.values.transpose(1, 2)  # B x R x R, symmetric
        cross = cross.baddbmm_(gram, u.attn, alpha=0.5)  # (the quadratic term, halved)
        return self._norm2(level, key, weight) + 2 * (torch.linalg.vecdot(cross, u.attn, dim=1) + bias)

    def _norm2(self, level: int, key: Key, weight: torch.Tensor) -> torch.Tensor:
        """Row sums of weight * K_level^2 (B x M)."""
        if level == 0:
            return self.image.weighted_norms(key, weight).expand(self.batch, -1)
        u = self.updates[level - 1]
        g2 = u.gamma.square() * weight
        gb = u.gamma * u.beta * weight
        x2 = self._x_norm2(level - 1, u, key + ("n2", level), g2)
        xg = self._x_dot(level - 1, u, key + ("n1", level), g2)
        xb = self._x_dot(level - 1, u, key + ("nb", level), gb)
        r, mu = u.rstd, u.mean
        inner = x2 - 2 * mu * xg + mu.square() * g2.sum()
        return r.square() * inner + 2 * r * (xb - mu * gb.sum()) + (weight * u.beta.square()).sum()
