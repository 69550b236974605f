"""KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with LDMs").

Module names mirror diffusers' `AutoencoderKL` (encoder.down_blocks.0.resnets.0, quant_conv,
decoder.up_blocks.0.upsamplers.0.conv, ...) so Stable Diffusion VAE weights load with a plain
key rename. Images live in [-1, 1]; `decode` takes *unscaled* latents: multiplying by
`scaling_factor` (to give the diffusion model unit-variance latents) is the caller's job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layers import Attention, Downsample, ResnetBlock, Upsample, group_norm

_EPS = 1e-6  # every GroupNorm in SD's VAE uses eps 1e-6 (the U-Net uses 1e-5)


@dataclass(frozen=True)
class VAEConfig:
    """The autoencoder's architecture, plus the latent scaling factor.

    `scaling_factor` is not architecture: it is 1 / std of the training latents, measured after
    training (0.18215 for SD 1.x/2.x). It is carried here so that one `model.json` config holds
    everything needed to go between images and unit-variance diffusion latents.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 1.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown VAE config keys {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


VAE_PRESETS: dict[str, VAEConfig] = {
    # f=4, 572,183 parameters: 64px images -> 16x16x4 latents, trains on a laptop CPU.
    "f4-tiny": VAEConfig(block_out_channels=(32, 48, 48), layers_per_block=1, norm_groups=8),
    # f=4 with 8 latent channels: 64px images -> 16x16x8 latents; the same widths as f4-tiny
    # but twice the numbers per latent pixel, for details f4-tiny loses (a small star's points).
    "f4c8-tiny": VAEConfig(
        block_out_channels=(32, 48, 48), layers_per_block=1, latent_channels=8, norm_groups=8
    ),
    # f=8, 646,551 parameters: 64px images -> 8x8x4 latents.
    "f8-tiny": VAEConfig(block_out_channels=(32, 32, 48, 48), layers_per_block=1, norm_groups=8),
    # Stable Diffusion 1.x/2.x AutoencoderKL: 83,653,863 parameters.
    "sd": VAEConfig(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_groups=32,
        scaling_factor=0.18215,
    ),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """A registered config with fields replaced, e.g. vae_preset("f4-tiny", latent_channels=3)."""
    if name not in VAE_PRESETS:
        raise UserError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}")
    return dataclasses.replace(VAE_PRESETS[name], **overrides)


# --------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z | x) from encoder moments (B, 2C, h, w) = [mean, logvar]."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as in LDM: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(
        self, generator: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Reparameterised draw mean + std * eps; a list of generators seeds each image alone."""
        if generator is None or isinstance(generator, torch.Generator):
            eps = _randn(self.mean.shape, generator, self.mean)
        else:
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"{len(generator)} generators for {self.mean.shape[0]} images")
            eps = torch.cat([_randn((1, *self.mean.shape[1:]), g, self.mean) for g in generator])
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over (C, h, w): shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log q(x) per sample, summed over (C, h, w): shape (B,)."""
        sq = (x - self.mean).pow(2) / self.var
        return 0.5 * (math.log(2 * math.pi) + self.logvar + sq).sum(dim=(1, 2, 3))


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor):
    # Draw on the generator's device so a CPU generator gives the same noise for a CUDA model.
    device = like.device if generator is None else generator.device
    eps = torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return eps.to(like.device)


# --------------------------------------------------------------------------- network


def _resnet(in_ch: int, out_ch: int, groups: int) -> ResnetBlock:
    return ResnetBlock(in_ch, out_ch, temb_dim=None, groups=groups, eps=_EPS)


class VAEAttention(Attention):
    """Single-head self-attention over the h*w positions, GroupNorm before, residual after.

    A subclass (not a wrapper) of `Attention` so keys stay flat like diffusers':
    attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, 1, qkv_bias=True)
        self.group_norm = group_norm(channels, groups, _EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class _MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)] if attention else [])
        self.resnets = nn.ModuleList([_resnet(ch, ch, groups), _resnet(ch, ch, groups)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)


class _Level(nn.Module):
    """ResNet blocks at one resolution, then an optional down- or upsampler (diffusers names)."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n)
        )
        if resample == "down":  # SD's VAE pads right/bottom only, then a stride-2 conv
            self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        for resampler in getattr(self, "downsamplers", getattr(self, "upsamplers", ())):
            h = resampler(h)
        return h


class Encoder(nn.Module):
    """x (B, in, H, W) -> moments (B, 2 * latent, H / f, W / f) before quant_conv."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chans, g = c.block_out_channels, c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        ch = chans[0]
        for i, out in enumerate(chans):
            last = i == len(chans) - 1
            self.down_blocks.append(
                _Level(ch, out, c.layers_per_block, g, None if last else "down")
            )
            ch = out
        self.mid_block = _MidBlock(ch, g, c.mid_attention)
        self.conv_norm_out = group_norm(ch, g, _EPS)
        self.conv_out = nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (B, latent, h, w) -> image (B, out, h*f, w*f); one more ResNet per level than Encoder."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chans, g = tuple(reversed(c.block_out_channels)), c.norm_groups
        self.conv_in = nn.Conv2d(c.latent_channels, chans[0], 3, padding=1)
        self.mid_block = _MidBlock(chans[0], g, c.mid_attention)
        self.up_blocks = nn.ModuleList()
        ch = chans[0]
        for i, out in enumerate(chans):
            last = i == len(chans) - 1
            self.up_blocks.append(
                _Level(ch, out, c.layers_per_block + 1, g, None if last else "up")
            )
            ch = out
        self.conv_norm_out = group_norm(ch, g, _EPS)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's AutoencoderKL: encoder -> quant_conv -> q(z|x); z -> post_quant_conv -> decoder.

    `tile_size` bounds memory on large inputs: overlapping tiles are processed one at a time and
    blended with linear ramps (diffusers' tiled_decode idea). Results differ slightly from the
    untiled pass because GroupNorm statistics (and attention) see one tile, not the whole image.
    `slice_batch=True` processes one image at a time (identical results up to float rounding).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not config.block_out_channels:
            raise UserError("VAE block_out_channels must name at least one level")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        m = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(m, m, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def encode(
        self,
        x: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        slice_batch: bool = False,
    ) -> DiagonalGaussian:
        """Images (B, in, H, W) in [-1, 1] -> posterior over (B, latent, H/f, W/f).

        `tile_size` and `tile_overlap` are in image pixels (multiples of f); moments are blended.
        """
        f = self.downsample_factor

        def moments(t: torch.Tensor) -> torch.Tensor:
            return self.quant_conv(self.encoder(t))

        run = moments
        if tile_size is not None:
            run = lambda t: _tiled(moments, t, tile_size, tile_overlap, up=1, down=f)  # noqa: E731
        if slice_batch:
            return DiagonalGaussian(torch.cat([run(xi) for xi in x.split(1)]))
        return DiagonalGaussian(run(x))

    def decode(
        self,
        z: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        slice_batch: bool = False,
    ) -> torch.Tensor:
        """Unscaled latents (B, latent, h, w) -> images (B, out, h*f, w*f), roughly in [-1, 1].

        `tile_size` and `tile_overlap` (default tile_size // 4) are in latent pixels.
        """
        f = self.downsample_factor

        def dec(t: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.post_quant_conv(t))

        run = dec
        if tile_size is not None:
            run = lambda t: _tiled(dec, t, tile_size, tile_overlap, up=f, down=1)  # noqa: E731
        if slice_batch:
            return torch.cat([run(zi) for zi in z.split(1)])
        return run(z)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# --------------------------------------------------------------------------- tiling


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins at a fixed stride, the last one flush with the end."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]


def _ramp(n: int, overlap: int, rise: bool, fall: bool, like: torch.Tensor) -> torch.Tensor:
    """1-D blend weights: linear ramps over `overlap` pixels on edges that touch another tile.

    Ramps of neighbouring tiles sum to 1 over a regular overlap; `_tiled` still normalises by
    the summed weights, which covers the larger overlap of the end-flush last tile.
    """
    w = torch.ones(n, device=like.device, dtype=like.dtype)
    if overlap <= 0:
        return w
    pos = torch.arange(n, device=like.device, dtype=like.dtype) + 0.5
    if rise:
        w = torch.minimum(w, pos / overlap)
    if fall:
        w = torch.minimum(w, (n - pos) / overlap)
    return w


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int | None,
    *,
    up: int,
    down: int,
) -> torch.Tensor:
    """Apply a resolution-changing `fn` (scale up / down) tile by tile and blend the outputs."""
    B, _, H, W = x.shape
    if overlap is None:
        overlap = tile // 4 // down * down
    if tile <= 0 or not 0 <= overlap < tile:
        raise UserError(f"need 0 <= tile_overlap < tile_size, got {overlap} and {tile}")
    if tile % down or overlap % down or H % down or W % down:
        raise UserError(
            f"tile_size {tile}, tile_overlap {overlap} and input size {H}x{W} "
            f"must be multiples of the downsampling factor {down}"
        )
    ys = _tile_starts(H, tile, tile - overlap)
    xs = _tile_starts(W, tile, tile - overlap)
    ov = overlap * up // down  # overlap in output pixels
    out = weight = None
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            t = fn(x[:, :, y0 : y0 + tile, x0 : x0 + tile])  # (B, C_out, th, tw)
            th, tw = t.shape[-2:]
            if out is None:
                out = t.new_zeros(B, t.shape[1], H * up // down, W * up // down)
                weight = t.new_zeros(H * up // down, W * up // down)
            wy = _ramp(th, ov, iy > 0, iy < len(ys) - 1, t)
            wx = _ramp(tw, ov, ix > 0, ix < len(xs) - 1, t)
            w = wy[:, None] * wx[None, :]  # (th, tw)
            oy, ox = y0 * up // down, x0 * up // down
            out[:, :, oy : oy + th, ox : ox + tw] += t * w
            weight[oy : oy + th, ox : ox + tw] += w
    return out / weight


# --------------------------------------------------------------------------- live preview


@torch.no_grad()
def fit_latent_rgb_map(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Least-squares linear map (with bias) from latent channels to RGB: (3, latent + 1).

    Targets are the images average-pooled to latent resolution; latents are the posterior mode.
    Applying it (`latent_to_rgb_preview`) costs one tiny matmul: a free live preview.
    """
    z = vae.encode(images).mode()  # (B, C, h, w)
    target = F.adaptive_avg_pool2d(images, z.shape[-2:])  # (B, 3, h, w)
    C = z.shape[1]
    X = z.permute(0, 2, 3, 1).reshape(-1, C).double()  # (B*h*w, C)
    X = torch.cat([X, torch.ones_like(X[:, :1])], dim=1)  # (N, C + 1), bias column
    Y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]).double()  # (N, 3)
    coef = torch.linalg.lstsq(X.cpu(), Y.cpu()).solution  # (C + 1, 3)
    return coef.T.to(dtype=images.dtype, device=images.device).contiguous()


def latent_to_rgb_preview(z: torch.Tensor, rgb_map: torch.Tensor) -> torch.Tensor:
    """Cheap preview of latents (B, C, h, w) -> RGB (B, 3, h, w) in [-1, 1] via a fitted map."""
    rgb_map = rgb_map.to(device=z.device, dtype=z.dtype)
    if rgb_map.shape[1] != z.shape[1] + 1:
        raise ValueError(f"rgb map is for {rgb_map.shape[1] - 1} latent channels, got {z.shape[1]}")
    rgb = torch.einsum("oc,bchw->bohw", rgb_map[:, :-1], z) + rgb_map[:, -1, None, None]
    return rgb.clamp(-1.0, 1.0)
