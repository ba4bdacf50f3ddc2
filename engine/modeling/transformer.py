"""The two-way transformer of the mask decoder: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.modeling import batch_rows
from engine.modeling.common import MLPBlock


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        """
        Arguments:
          depth (int): number of two-way blocks (2 in SAM).
          embedding_dim (int): token width (256).
          num_heads (int): attention heads (8).
          mlp_dim (int): hidden width of the token MLP (2048 in the official models).
          attention_downsample_rate (int): cross-attentions project to embedding_dim / rate.
        """
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          image_embedding (torch.Tensor): BxCxHxW.
          image_pe (torch.Tensor): 1xCxHxW (or BxCxHxW) positional encoding of the image tokens.
          point_embedding (torch.Tensor): BxNxC prompt (and output) tokens.
        Returns:
          (torch.Tensor): BxNxC processed tokens.
          (torch.Tensor): Bx(H*W)xC processed image tokens.
        """
        # Token-major views, as Meta's (a contiguous copy changes the float32 rounding of the
        # projections below, and with it the bit-for-bit agreement).
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        if self.final_attn_token_to_image.reassociate:
            # Not bit-for-bit anyway: token-major copies make every elementwise pass over the
            # image tokens (PE sums, residuals, layer norms) run along memory, ~30% of this path.
            keys, key_pe = keys.contiguous(), key_pe.contiguous()
        # After the first block the image tokens are per prompt and token-major: a token-major
        # PE makes their `keys + PE` sums read along memory (same values, same layout out).
        later_pe = key_pe.contiguous()
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, point_embedding, key_pe if i == 0 else later_pe)
        attn_out = self.final_attn_token_to_image.tokens_to_image(
            q=queries + point_embedding, k=keys + later_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module],
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.token_self_attention(queries, query_pe)

        q = queries + query_pe
        k = keys + key_pe  # the image side is unchanged until the end of the block: one sum
        attn_out = self.cross_attn_token_to_image.tokens_to_image(q=q, k=k, v=keys)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        attn_out = self.cross_attn_image_to_token.image_to_tokens(q=k, k=q, v=queries)
        # attn_out first: the sum takes its token-major layout, so the layer norm needs no copy
        # of the first block's (image-major) sum; float addition commutes, the bits are the same.
        keys = self.norm4(attn_out + keys)
        return queries, keys

    def token_self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """The block's first step: the prompt tokens attend to each other (then norm1)."""
        if self.skip_first_layer_pe:
            # The first layer's tokens ARE the prompt encodings: replace, no residual, no PE re-added.
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        return self.norm1(queries)


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate`.

    The two cross-attentions of the decoder pair a few prompt tokens (N, about 7 for one click)
    with 4096 image tokens. `tokens_to_image` and `image_to_tokens` compute the same function as
    `forward` with the linear projections re-associated, so that the 4096 image tokens meet
    heads x N vectors instead of being projected to the internal width; that halves the work per
    prompt (the dominant cost of the automatic generator and of a click). The softmax's shift
    invariance drops the key-bias term of the token->image logits, and the value bias passes
    through the softmax because its rows sum to one. Both fall back to `forward` where the
    re-association would not save work, or when `reassociate` is False: the sums then run in
    Meta's order and reproduce its float32 results bit for bit (re-associated, predicted IoUs
    move by ~1e-6, enough to swap two candidates tied to that precision).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"attention width {self.internal_dim} is not divisible by num_heads={num_heads}: "
                "pick a head count that divides embedding_dim / downsample_rate"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.reassociate = True  # False: Meta's order of operations, bit for bit (see the class)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.reshape(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prompt_queries: bool = True,
        prompt_keys: bool = True,
    ) -> torch.Tensor:
        """Meta's order of operations. prompt_queries / prompt_keys: q (and the output) / k and v
        are prompt tokens, whose projections `batch_rows` may compute at another batch's size."""
        q = self._split_heads(self._project(self.q_proj, q, prompt_queries))
        k = self._split_heads(self._project(self.k_proj, k, prompt_keys))
        v = self._split_heads(self._project(self.v_proj, v, prompt_keys))
        attn = q @ k.permute(0, 1, 3, 2)
        attn = (attn / math.sqrt(q.shape[-1])).softmax(dim=-1)
        return self._project(self.out_proj, self._merge_heads(attn @ v), prompt_queries)

    @staticmethod
    def _project(layer: nn.Linear, x: torch.Tensor, prompt_side: bool) -> torch.Tensor:
        return batch_rows.linear(layer, x) if prompt_side else layer(x)

    def _head_weights(self, linear: nn.Linear) -> torch.Tensor:
        """A q/k/v projection weight as heads x head_dim x embedding_dim."""
        return linear.weight.view(self.num_heads, self.internal_dim // self.num_heads, -1)

    def tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`forward` for few queries (B x N x C tokens) over many keys (B x M x C image tokens)."""
        batch, tokens, width = q.shape
        heads = self.num_heads
        if not self.reassociate or batch * heads * tokens >= k.shape[0] * self.internal_dim:
            return self(q, k, v, prompt_keys=False)  # cheaper to project the (shared) keys once
        head_dim = self.internal_dim // heads
        qh = self._split_heads(self.q_proj(q))  # B x H x N x d
        # (q Wq_h + bq)(k Wk_h + bk)^T = [(q Wq_h + bq) Wk_h^T] k^T + a constant per query row
        reach = (qh @ self._head_weights(self.k_proj)).reshape(batch, heads * tokens, width)
        attn = (reach @ k.transpose(1, 2) / math.sqrt(head_dim)).softmax(dim=-1)  # B x HN x M
        mixed = (attn @ v).view(batch, heads, tokens, width)  # softmax(.) v, before v_proj
        values = mixed @ self._head_weights(self.v_proj).transpose(1, 2)
        values = values + self.v_proj.bias.view(heads, 1, head_dim)
        return self.out_proj(self._merge_heads(values))

    def image_to_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`forward` for many queries (1 or B x M x C image tokens) over few keys (B x N x C)."""
        batch, tokens, width = k.shape
        heads = self.num_heads
        if not self.reassociate or heads * tokens >= self.internal_dim:
            return self(q, k, v, prompt_queries=False)
        head_dim = self.internal_dim // heads
        image_tokens = q.shape[1]
        kh = self.k_proj(k).view(batch, tokens, heads, head_dim).transpose(1, 2)  # B x H x N x d
        if q.shape[0] == 1 and batch * heads * tokens >= self.internal_dim:
            # Image tokens shared by many prompts: cheaper to project them once.
            qh = self.q_proj(q)[0].view(image_tokens, heads, head_dim).permute(1, 2, 0)
            logits = (kh @ qh).reshape(batch, heads * tokens, image_tokens)
        else:
            # (q Wq_h + bq) kh^T = q (Wq_h^T kh^T) + bq kh^T: the image tokens meet H*N vectors.
            reach = (kh @ self._head_weights(self.q_proj)).reshape(batch, -1, width)
            offset = kh @ self.q_proj.bias.view(heads, head_dim, 1)
            logits = reach @ q.transpose(1, 2) + offset.reshape(batch, -1, 1)  # q may broadcast
        # Softmax over the N tokens, laid out as B x H x N x M so that it runs along M's stride.
        attn = (logits / math.sqrt(head_dim)).view(batch, heads, tokens, image_tokens).softmax(2)
        # out_proj(attn v_h) summed over heads = attn_cat [v_h Wo_h]: N x C per head and prompt.
        vh = self.v_proj(v).view(batch, tokens, heads, head_dim).transpose(1, 2)
        out_weight = self.out_proj.weight.view(width, heads, head_dim).permute(1, 2, 0)
        projected = (vh @ out_weight).reshape(batch, heads * tokens, width)  # B x HN x C
        attn = attn.reshape(batch, heads * tokens, image_tokens).transpose(1, 2)
        return torch.baddbmm(self.out_proj.bias.expand(batch, 1, width), attn, projected)
