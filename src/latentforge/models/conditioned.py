"""Image-conditioned U-Nets: super-resolution (SR3, Saharia et al. 2022) and inpainting
(SD-inpainting, Rombach et al. 2022) models that see a conditioning image concatenated to x.

The conditioning image travels through the denoiser's **cond untouched: the denoiser scales x
by c_in, and it must not scale the conditioning image. The functions below fix what the extra
channels hold; training (`training/tasks.py`) and sampling (`pipelines/superres.py`,
`pipelines/inpaint.py`) both build them here, so the two cannot drift apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layers import TimestepEmbedding, timestep_embedding
from .presets import UNetConfig
from .unet import UNet

# The augmentation level (a noise std in [-1, 1] image units, mostly in [0, 0.3]) is embedded
# like a timestep of a 1000-step schedule, so the sinusoid's frequencies resolve it.
NOISE_LEVEL_SCALE = 1000.0


class ConcatUNet(nn.Module):
    """A U-Net over cat([x, concat]) whose in_channels = base channels + `concat_channels`.

    With `noise_level=True` (super-resolution) the level of the Gaussian noise augmentation of
    the low-res image (Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.2; the SD x4
    upscaler's `noise_level`) is embedded sinusoidally, passed through an MLP and added to the
    time embedding.
    """

    def __init__(self, config: UNetConfig, concat_channels: int, *, noise_level: bool = False):
        super().__init__()
        base = config.in_channels - concat_channels
        if concat_channels < 1 or base < 1:
            raise ValueError(
                f"in_channels {config.in_channels} must exceed concat_channels {concat_channels}"
            )
        if config.out_channels != base:
            raise ValueError(f"out_channels {config.out_channels} != base channels {base}")
        self.unet = UNet(config)
        self.concat_channels = concat_channels
        ch = config.block_out_channels[0]
        self.noise_level_embedding = TimestepEmbedding(ch, ch * 4) if noise_level else None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        concat: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        **cond,
    ) -> torch.Tensor:
        """x: (B, C, H, W); concat: (B, concat_channels, H, W); noise_level: (B,) or () aug level
        (0 when not given); cond: class_labels / context / context_mask as for UNet."""
        if concat is None:
            raise UserError(
                "this model needs a conditioning image (a super-resolution or inpainting model): "
                "use `latentforge upscale` or `latentforge inpaint`"
            )
        B = x.shape[0]
        if concat.shape != (B, self.concat_channels, *x.shape[-2:]):
            raise ValueError(
                f"concat must be {(B, self.concat_channels, *x.shape[-2:])}, "
                f"got {tuple(concat.shape)}"
            )
        extra_emb = None
        if self.noise_level_embedding is not None:
            level = torch.zeros(B) if noise_level is None else torch.as_tensor(noise_level)
            level = level.to(x.device, torch.float32).expand(B)
            c = self.unet.config
            emb = timestep_embedding(
                level * NOISE_LEVEL_SCALE,
                c.block_out_channels[0],
                flip_sin_to_cos=c.flip_sin_to_cos,
                freq_shift=c.freq_shift,
            )
            extra_emb = self.noise_level_embedding(emb.to(x.dtype))  # (B, temb_dim)
        h = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C + concat_channels, H, W)
        return self.unet(h, t, extra_emb=extra_emb, **cond)


# ----- super-resolution conditioning -----------------------------------------------------------
def downsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """The training degradation: (B, C, H, W) -> (B, C, H / scale, W / scale), area average."""
    return F.interpolate(images, scale_factor=1 / scale, mode="area")


def lowres_condition(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A low-res image resized to the denoiser's resolution `size`: bicubic up (clamped to
    [-1, 1]), area down. A latent model gets it at the latent resolution, still in pixel
    channels (as the SD x4 upscaler concatenates the low-res RGB image to its latents)."""
    size = tuple(size)
    if tuple(low.shape[-2:]) == size:
        return low
    if size[0] >= low.shape[-2] and size[1] >= low.shape[-1]:
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    return F.interpolate(low, size=size, mode="area")


def augment(cond: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise conditioning augmentation: cond + level * noise, level (B,) a std in image units."""
    return cond + level.to(cond).reshape(-1, 1, 1, 1) * noise


# ----- inpainting conditioning -----------------------------------------------------------------
def masked_image(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The image with its masked part (mask 1 = regenerate) set to 0, mid-grey in [-1, 1]."""
    return images * (1 - masks)


def inpaint_condition(masks: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """cat([mask, masked image]) at the denoiser's resolution: (B, 1 + C, h, w). `masked` is the
    masked image in the denoiser's space (its VAE latent for latent models); the (B, 1, H, W)
    mask is max-pooled down, so a latent cell is masked when any pixel it covers is."""
    small = F.adaptive_max_pool2d(masks.float(), masked.shape[-2:])  # (B, 1, h, w)
    return torch.cat([small.to(masked), masked], dim=1)
