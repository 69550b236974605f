"""The denoising-diffusion GAN's discriminator (Xiao, Kreis and Vahdat 2022, DDGAN).

DDGAN replaces the Gaussian reverse step of a diffusion model with a conditional GAN: a
generator predicts x0 from (x_t, t) and the posterior q(x_{t-1} | x_t, x0) gives x_{t-1}; a
time-conditional discriminator tells real pairs (x_{t-1}, x_t) from generated ones. With a few
large steps (T = 2-4) the reverse distribution is far from Gaussian, which is what the GAN
learns. The generator is the project's U-Net (x0 prediction); this module is the other player.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Downsample, ResnetBlock, TimestepEmbedding, timestep_embedding


class TimeDiscriminator(nn.Module):
    """D(x_prev, x_t, t [, text | class]) -> (B,) logits.

    The pair is stacked on the channel axis, then ResNet blocks with the time embedding and a
    halving after each level, a sum over space, and a linear read-out. A conditional model adds
    a projection term (Miyato & Koyama 2018): the inner product of the pooled features with an
    embedding of the condition (the mean of the text tokens, or a class row), so a pair that
    does not fit its prompt is told apart."""

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...] = (32, 64, 128),
        *,
        context_dim: int | None = None,
        num_classes: int = 0,
        groups: int = 8,
    ):
        super().__init__()
        self.channels = channels
        temb = channels[0] * 4
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.conv_in = nn.Conv2d(2 * in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        ch = channels[0]
        for i, out in enumerate(channels):
            self.blocks.append(ResnetBlock(ch, out, temb_dim=temb, groups=groups))
            ch = out
            self.downsamplers.append(Downsample(ch) if i < len(channels) - 1 else nn.Identity())
        self.act = nn.SiLU()
        self.out = nn.Linear(ch, 1)
        self.context_proj = nn.Linear(context_dim, ch) if context_dim else None
        self.class_embedding = nn.Embedding(num_classes + 1, ch) if num_classes else None

    def forward(
        self,
        x_prev: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        temb = self.time_embedding(timestep_embedding(t, self.channels[0]).to(x_t.dtype))
        h = self.conv_in(torch.cat([x_prev, x_t], dim=1))
        for block, down in zip(self.blocks, self.downsamplers, strict=True):
            h = down(block(h, temb))
        h = self.act(h).sum(dim=(2, 3))  # (B, C)
        logit = self.out(h).squeeze(1)
        if self.context_proj is not None and context is not None:
            if context_mask is None:
                pooled = context.mean(1)
            else:
                m = context_mask.to(context.dtype).unsqueeze(-1)
                pooled = (context * m).sum(1) / m.sum(1).clamp(min=1)
            logit = logit + (h * self.context_proj(pooled.to(h.dtype))).sum(1)
        if self.class_embedding is not None and class_labels is not None:
            logit = logit + (h * self.class_embedding(class_labels)).sum(1)
        return logit
