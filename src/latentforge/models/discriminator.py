"""PatchGAN discriminator (Isola et al. 2017), as the LDM autoencoder uses for sharper decodes."""

from __future__ import annotations

import torch
from torch import nn

from .layers import group_norm


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convolutions -> one real/fake logit per overlapping patch, (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers - 1 else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1), group_norm(out, 8), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): relu(1 - D(real)) + relu(1 + D(fake))."""
    return 0.5 * (torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean())
