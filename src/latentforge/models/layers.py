"""Building blocks shared by the U-Net and the VAE: norms, ResNet blocks, attention, embeddings.

Module names follow the Stable Diffusion / diffusers layout (resnets, attentions, to_q, ...)
so that outside checkpoints map onto these modules with a plain key rename.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=eps)


def timestep_embedding(
    t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps (Vaswani et al. 2017; DDPM), (B,) -> (B, dim).

    Frequencies exp(-ln(10000) * i / (half - freq_shift)) as in SD; flip_sin_to_cos puts cos first.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with an additive embedding projection (DDPM / SD ResnetBlock2D)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        temb_dim: int | None,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch) if temb_dim else None
        self.norm2 = group_norm(out_ch, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


# Score matrices (batch x heads x queries x keys) larger than this are computed a slice of queries
# at a time where SDPA has no memory-efficient kernel. CUDA (flash / memory-efficient) and CPU
# (flash since torch 2.2; 16,384 tokens x 8 heads peak +25 MB here instead of 8.6 GB) never
# build the matrix; MPS falls back to the math kernel, which does. LATENTFORGE_ATTENTION=sliced
# forces slicing on every device (tests, or a backend that runs out of memory), =full never.
SLICE_SCORE_BYTES = 512 * 2**20


def _slices_queries(q: torch.Tensor, keys: int) -> int:
    """Queries per slice for SDPA on q (B, heads, N, d) over `keys` keys; N = one whole pass."""
    mode = os.environ.get("LATENTFORGE_ATTENTION", "auto")
    if mode == "full" or (mode != "sliced" and q.device.type != "mps"):
        return q.shape[2]
    per_query = q.shape[0] * q.shape[1] * keys * q.element_size()
    return max(1, min(q.shape[2], SLICE_SCORE_BYTES // per_query))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA over (B, heads, tokens, d) tensors, in query slices where the backend would hold
    the whole score matrix (`SLICE_SCORE_BYTES`); each query's softmax sees every key, so a
    slice's rows are the rows of the full result."""
    step = _slices_queries(q, k.shape[2])
    if step >= q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for start in range(0, q.shape[2], step):
        rows = slice(start, start + step)
        out[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask)
    return out


class Attention(nn.Module):
    """Multi-head (cross-)attention through torch SDPA; context=None means self-attention."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        ctx = x if context is None else context
        # (B, tokens, C) -> (B, heads, tokens, C // heads)
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k = self.to_k(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, keys)
        out = attention(q, k, v, attn_mask)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, tokens, C)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020), the SD transformer feed-forward input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, optional cross-attention to a context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.attn2 = Attention(dim, heads, context_dim=context_dim) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None and context is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class ContextRefiner(nn.Module):
    """Trainable pre-LN self-attention layers over a frozen text encoder's tokens.

    The tokens are projected to `width`, given sinusoidal positions, refined by `layers`
    (self-attention with the padding mask, GEGLU feed-forward) and projected back; the result
    is added to the input. The output projection starts at zero, so a new refiner is the
    identity and a model fine-tuned from one without it starts exactly where its source was.
    """

    def __init__(self, dim: int, width: int, layers: int, heads: int = 4):
        super().__init__()
        self.width = width
        self.proj_in = nn.Linear(dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2 * layers))
        self.attns = nn.ModuleList(Attention(width, heads) for _ in range(layers))
        self.ffs = nn.ModuleList(FeedForward(width, mult=2) for _ in range(layers))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """context: (B, tokens, dim); mask: (B, tokens), True = real token."""
        positions = torch.arange(context.shape[1], device=context.device)
        h = self.proj_in(context) + timestep_embedding(positions, self.width).to(context.dtype)
        for i, (attn, ff) in enumerate(zip(self.attns, self.ffs, strict=True)):
            h = h + attn(self.norms[2 * i](h), None, mask)
            h = h + ff(self.norms[2 * i + 1](h))
        return context + self.proj_out(self.norm_out(h))


class SpatialTransformer(nn.Module):
    """SD's Transformer2DModel: GroupNorm, project in, transformer blocks over HW tokens, out."""

    def __init__(
        self,
        channels: int,
        heads: int,
        *,
        context_dim: int | None,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
    ):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = group_norm(channels, groups, eps=1e-6)
        if linear_projection:  # SD 2.x
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:  # SD 1.x
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int, *, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # SD's VAE pads right/bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
