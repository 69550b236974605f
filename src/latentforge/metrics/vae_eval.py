"""Autoencoder reconstruction quality on held-out images (`latentforge eval vae`).

Each image is encoded, its posterior mode decoded, and the result scored against the original
with PSNR and SSIM. Held-out images come from the data spec with a different stream seed
(default 1; the VAE trainer draws from stream 0), so none of them was a training image. The
spec may differ from the training one: `shapes:64` scores a VAE trained on
`shapes:64:holdout` on the colour/shape pairs it never saw as well.
"""

from __future__ import annotations

import torch
from torch import nn

from ..training.data import held_out_images
from .batching import run_batched
from .quality import psnr_per_image, ssim


def evaluate_vae(
    vae: nn.Module,
    meta: dict,
    *,
    n: int = 256,
    data: str | None = None,
    data_seed: int = 1,
    batch: int = 64,
    progress: bool = False,
) -> dict:
    """PSNR / SSIM of encode -> posterior mode -> decode on n held-out images, and the std of
    the scaled latents (about 1 when the stored scaling factor fits these images)."""
    spec = data or meta["data"]["spec"]
    images = held_out_images(spec, n, data_seed)
    sq = []  # per batch: mean square of the latents x batch size

    @torch.no_grad()
    def reconstruct(a: int, b: int) -> torch.Tensor:
        z = vae.encode(images[a:b]).mode()
        sq.append(z.float().pow(2).mean().item() * (b - a))
        return vae.decode(z).clamp(-1, 1)

    recon, seconds = run_batched(reconstruct, n, batch, progress=progress, desc="reconstructing")
    psnr = psnr_per_image(recon, images)
    scaling = meta.get("scaling_factor", 1.0)
    return {
        "n": n,
        "data": spec,
        "data_seed": data_seed,
        "downsample_factor": vae.downsample_factor,
        "latent_channels": vae.latent_channels,
        "psnr_db": round(psnr.mean().item(), 3),
        "psnr_min_db": round(psnr.min().item(), 3),
        "ssim": round(ssim(recon, images).mean().item(), 4),
        "scaled_latent_rms": round(scaling * (sum(sq) / n) ** 0.5, 4),
        "images_per_s": round(n / seconds, 3),
    }
