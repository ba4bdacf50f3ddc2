"""The SAM image encoder: a plain ViT with windowed and global attention and a neck to 256x64x64.

Parameter names follow Meta's checkpoints (`patch_embed.proj`, `pos_embed`, `blocks.N.attn.qkv`,
`blocks.N.attn.rel_pos_h`, `neck.0..3`), so the official `sam_vit_*.pth` files load unchanged.
Any other encoder producing the same BxCx64x64 embedding can replace this one inside `Sam`.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.modeling.common import LayerNorm2d, MLPBlock


class ImageEncoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        layernorm_eps: float = 1e-6,
        neck_layernorm_eps: float = 1e-6,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        """
        Arguments:
          img_size (int): side of the square, padded input image.
          patch_size (int): side of a patch; the token grid is img_size // patch_size.
          embed_dim, depth, num_heads, mlp_ratio: ViT width, number of blocks, heads, MLP width ratio.
          out_chans (int): channels of the output embedding (the prompt embedding dim, 256).
          window_size (int): side of the attention windows of the non-global blocks (0: all global).
          global_attn_indexes (Sequence[int]): blocks that attend over the whole token grid.
        """
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                layernorm_eps=layernorm_eps,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=neck_layernorm_eps),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=neck_layernorm_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS normalised image -> BxCxGxG embedding (C = out_chans, G = S / patch_size)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patches through one strided convolution; output is channel-last BxGxGxD."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; window_size > 0 restricts attention to non-overlapping windows."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        layernorm_eps: float,
        use_rel_pos: bool,
        window_size: int,
        grid_size: int,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layernorm_eps)
        attn_size = window_size if window_size > 0 else grid_size
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, (attn_size, attn_size))
        self.norm2 = nn.LayerNorm(dim, eps=layernorm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention over a BxHxWxD token grid with decomposed relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        use_rel_pos: bool,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        # Without autograd the logits are computed in one reused buffer, in place: the same
        # float32 operations in Meta's order (bit for bit), without allocating three fresh
        # heads x tokens^2 tensors per global block (134 MiB each on the parity model: fresh
        # pages were more than half of the encoder's time on a CPU).
        in_place = not torch.is_grad_enabled()
        logits = logits_buffer((q.shape[0], tokens, tokens), q) if in_place else None
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1), out=logits)
        if self.use_rel_pos:
            attn = add_rel_pos(
                attn, q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width), in_place
            )
        attn = torch.softmax(attn, -1, out=attn) if in_place else attn.softmax(dim=-1)
        x = (attn @ v).view(batch, self.num_heads, height, width, -1)
        x = x.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(x)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """BxHxWxC -> (B*nW)xwindowxwindowxC, zero-padding H and W up to multiples of `window`.

    Returns:
      (torch.Tensor): the windows.
      (tuple[int, int]): the padded (H, W), needed to undo the partition.
    """
    batch, height, width, channels = x.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    x = x.view(batch, hp // window, window, wp // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: (B*nW)xwindowxwindowxC -> BxHxWxC, padding removed."""
    hp, wp = padded
    batch = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(batch, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    return x[:, : size[0], : size[1], :].contiguous()


def relative_positions(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Table of relative-position embeddings for every (query, key) pair along one axis.

    The learned table has 2*S-1 rows; it is linearly resized when the sizes differ from training.
    Returns:
      (torch.Tensor): q_size x k_size x head_dim.
    """
    span = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != span:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=span, mode="linear"
        )
        rel_pos = resized.reshape(-1, span).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[offsets.long()]


def add_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
    in_place: bool = False,
) -> torch.Tensor:
    """Add the decomposed (height + width) relative-position terms to attention logits.

    The terms use the unscaled queries (MViTv2 style), as SAM's checkpoints were trained with.
    Arguments:
      attn (torch.Tensor): Bx(qh*qw)x(kh*kw) attention logits.
      q (torch.Tensor): Bx(qh*qw)xC queries.
      in_place (bool): add into `attn` (no autograd): the same two sums, in the same order.
    """
    qh, qw = q_size
    kh, kw = k_size
    table_h = relative_positions(qh, kh, rel_pos_h)
    table_w = relative_positions(qw, kw, rel_pos_w)
    batch, _, dim = q.shape
    grid_q = q.reshape(batch, qh, qw, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, table_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, table_w)
    grid = attn.view(batch, qh, qw, kh, kw)
    if in_place:
        grid.add_(rel_h[:, :, :, :, None]).add_(rel_w[:, :, :, None, :])
    else:
        grid = grid + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return grid.view(batch, qh * qw, kh * kw)


_BUFFERS = threading.local()
_MAX_BUFFERS = 4  # a model needs two shapes (windowed, global blocks); more: other image sizes


def logits_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor for attention logits, kept per thread and shape across calls.

    Kept, not freed: an encoder runs image after image (crop after crop in the automatic
    generator), and each fresh allocation of this size is new pages from the kernel. The cost
    is one logits tensor per shape and thread that encodes (global blocks: batch x heads x
    4096^2 floats: 134 MiB for the parity model's 2 heads, 1 GiB for ViT-H's 16), a third of
    what Meta's forward allocates in passing; `free_logits_buffers` gives it back.
    """
    buffers = getattr(_BUFFERS, "by_key", None)
    if buffers is None:
        buffers = _BUFFERS.by_key = {}
    key = (tuple(shape), like.dtype, like.device)
    buffer = buffers.get(key)
    if buffer is None:
        if len(buffers) >= _MAX_BUFFERS:
            buffers.clear()
        buffer = buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buffer


def free_logits_buffers() -> None:
    """Drop this thread's logits buffers (they come back, freshly allocated, on the next image)."""
    _BUFFERS.by_key = {}
