"""Full-reference image quality: PSNR and SSIM of images in [-1, 1], measured on [0, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] over the whole batch (one MSE), measured on the [0, 1] scale."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR of each image pair in [-1, 1], on the [0, 1] scale."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(B,) SSIM (Wang et al. 2004) of each image pair in [-1, 1], on the [0, 1] scale.

    The reference definition: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
    'valid' borders, the SSIM map averaged over pixels and channels. Images smaller than the
    window use a window of their own size."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
    x = (x.clamp(-1, 1).double() + 1) / 2
    y = (y.clamp(-1, 1).double() + 1) / 2
    C = x.shape[1]
    window = min(window, *x.shape[-2:])
    w = _gaussian_window(window, sigma, C).double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(1).float()
