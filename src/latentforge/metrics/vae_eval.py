"""Autoencoder reconstruction quality on held-out images (`latentforge eval vae`).

Each image is encoded, its posterior mode decoded, and the result scored against the original
with PSNR and SSIM. Held-out images come from the data spec with a different stream seed
(default 1; the VAE trainer draws from stream 0), so none of them was a training image. The
spec may differ from the training one: `shapes:64` scores a VAE trained on
`shapes:64:holdout` on the colour/shape pairs it never saw as well.

On `shapes` data the shapes analyser also reads every reconstruction back and checks it
against the scene's record: the fraction of scenes read back whole is the ceiling of any
latent model using this VAE (a detail the VAE loses, no U-Net can draw), reported overall and
for the scenes holding each kind of object ("small star": 5% for the f4-tiny VAE of the
embedded model, whose small stars come back as pentagons).
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import held_out_images, load_dataset
from ..io.model_folder import ModelMeta
from .batching import run_batched
from .quality import psnr_per_image, ssim


def evaluate_vae(
    vae: nn.Module,
    meta: ModelMeta,
    *,
    n: int = 256,
    data: str | None = None,
    data_seed: int = 1,
    batch: int = 64,
    progress: bool = False,
) -> dict:
    """PSNR / SSIM of encode -> posterior mode -> decode on n held-out images, and the std of
    the scaled latents (about 1 when the stored scaling factor fits these images)."""
    spec = data or meta.data.spec
    images = held_out_images(spec, n, data_seed)
    sq = []  # per batch: mean square of the latents x batch size

    @torch.no_grad()
    def reconstruct(a: int, b: int) -> torch.Tensor:
        z = vae.encode(images[a:b]).mode()
        sq.append(z.float().pow(2).mean().item() * (b - a))
        return vae.decode(z).clamp(-1, 1)

    recon, seconds = run_batched(reconstruct, n, batch, progress=progress, desc="reconstructing")
    psnr = psnr_per_image(recon, images)
    scaling = meta.scaling_factor or 1.0
    # data with a reader of its own (shapes) says how many reconstructions still show their scene
    extra = load_dataset(spec, seed=data_seed).read_back(recon) or {}
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
        **extra,
    }
