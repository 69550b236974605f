"""ControlNet (Zhang, Rao and Agrawala 2023): a trainable copy of a U-Net's encoder that reads
a control image (edges, a sketch, a pose) and adds zero-initialised residuals to the U-Net's
skip connections and mid block.

The copy is the one U-Net built without its decoder (`UNet(decoder=False)`), so module names
are diffusers' `ControlNetModel` names and its weights load with no renaming; the extra modules
are the control image's encoder (`controlnet_cond_embedding`) and the zero 1x1 convolutions
(`controlnet_down_blocks`, `controlnet_mid_block`).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .presets import UNetConfig
from .unet import Residuals, UNet


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """The copied U-Net's config and the control image's encoder.

    `embedding_channels`: widths of the control image encoder's levels; each level after the
    first halves the resolution, so a latent model with a VAE factor f needs log2(f) + 1
    entries (SD: (16, 32, 96, 256) for f = 8) and a pixel-space model one.
    `global_pool`: residuals averaged over space (diffusers' `global_pool_conditions`, the
    shuffle ControlNets), used with guess mode."""

    unet: UNetConfig
    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool: bool = False

    @property
    def downscale(self) -> int:
        """How much smaller the U-Net's input is than the control image."""
        return 2 ** (len(self.embedding_channels) - 1)

    def to_dict(self) -> dict:
        return {
            "unet": self.unet.to_dict(),
            "conditioning_channels": self.conditioning_channels,
            "embedding_channels": list(self.embedding_channels),
            "global_pool": self.global_pool,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        if not isinstance(d, dict) or not isinstance(d.get("unet"), dict):
            raise UserError("a ControlNet config needs a 'unet' section")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown ControlNet config keys {sorted(unknown)}")
        rest = {k: v for k, v in d.items() if k != "unet"}
        if "embedding_channels" in rest:
            rest["embedding_channels"] = tuple(rest["embedding_channels"])
        return cls(unet=UNetConfig.from_dict(d["unet"]), **rest)


class ControlEmbedding(nn.Module):
    """The control image's encoder: conv, then per level a conv and a stride-2 conv (SiLU after
    each), then a zero-initialised conv to the U-Net's first width (diffusers'
    `ControlNetConditioningEmbedding`)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in itertools.pairwise(channels):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(UNet):
    """A U-Net encoder that turns (x, t, text, control image) into U-Net residuals."""

    def __init__(self, config: ControlNetConfig, *, time_cond_proj_dim: int | None = None):
        super().__init__(config.unet, time_cond_proj_dim=time_cond_proj_dim, decoder=False)
        self.control_config = config
        chans = config.unet.block_out_channels
        self.controlnet_cond_embedding = ControlEmbedding(
            config.conditioning_channels, config.embedding_channels, chans[0]
        )
        # One zero conv per skip, in the order UNet.encode collects them.
        widths = [chans[0]]
        for level, out in enumerate(chans):
            widths += [out] * config.unet.layers_per_block
            if level < len(chans) - 1:
                widths.append(out)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(w, w, 1)) for w in widths)
        self.controlnet_mid_block = _zero(nn.Conv2d(chans[-1], chans[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNet, config: ControlNetConfig | None = None) -> ControlNet:
        """A ControlNet whose encoder starts as `unet`'s (the paper's initialisation): copied
        weights, zero residuals, so the controlled model starts as the model itself."""
        config = config or ControlNetConfig(unet=unet.config)
        if config.unet != unet.config:
            raise ValueError("the ControlNet's U-Net config differs from the U-Net it copies")
        net = cls(config, time_cond_proj_dim=unet.time_cond_proj_dim)
        missing, _ = net.load_state_dict(unet.state_dict(), strict=False)
        extra = [k for k in missing if not k.startswith("controlnet_")]
        if extra:
            raise ValueError(f"the U-Net lacks ControlNet weights {extra[:3]}")
        return net.to(next(unet.parameters()).dtype)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        image: torch.Tensor,
        *,
        scale: float | torch.Tensor = 1.0,
        guess_mode: bool = False,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        extra_emb: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> Residuals:
        """x, t and the conditioning as for `UNet.forward`; image: (B, C, H*f, W*f) control
        image in [0, 1] (f = `config.downscale`). scale multiplies every residual (a float or a
        (B,) tensor); guess mode scales them from 0.1 (first skip) to 1 (mid block),
        log-spaced, as diffusers does."""
        temb = self.embed_time(
            x, t, class_labels=class_labels, extra_emb=extra_emb, guidance=guidance,
            text_embeds=text_embeds, time_ids=time_ids,
        )  # fmt: skip
        if context is not None:
            context = self.refine_context(context, context_mask)
        control = self.controlnet_cond_embedding(image.to(x.dtype))
        if control.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"control image {tuple(image.shape[-2:])} does not match the input "
                f"{tuple(x.shape[-2:])} x {self.control_config.downscale}"
            )
        h, skips = self.encode(self.stem(x) + control, temb, context, context_mask)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(h)
        n = len(down) + 1
        if guess_mode and not self.control_config.global_pool:
            weights = torch.logspace(-1, 0, n, device=x.device).tolist()
        else:
            weights = [1.0] * n
        scale = scale.view(-1, 1, 1, 1).to(x.dtype) if torch.is_tensor(scale) else scale
        down = [r * (w * scale) for r, w in zip(down, weights, strict=False)]
        mid = mid * (weights[-1] * scale)
        if self.control_config.global_pool:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def add_residuals(parts: list[Residuals]) -> Residuals | None:
    """Several ControlNets' residuals summed (Multi-ControlNet); None for none."""
    if not parts:
        return None
    down, mid = parts[0]
    for d, m in parts[1:]:
        down = [a + b for a, b in zip(down, d, strict=True)]
        mid = mid + m
    return down, mid


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
