"""Super-resolution quality against bicubic on held-out images (`latentforge eval superres`).

Each held-out image is area-downsampled by the model's scale (the training degradation), then
upscaled twice: by the model and by bicubic interpolation. Both are scored against the original
with PSNR and SSIM. Held-out images come from the model's own data spec with a different
stream seed (`--data-seed`, default 1; models are trained on stream 0), so none of them was a
training image.
"""

from __future__ import annotations

import torch

from ..data import held_out_images
from ..io.model_folder import LoadedModel
from ..models.conditioned import downsample, lowres_condition
from ..pipelines.common import require_task
from ..pipelines.settings import SampleSettings
from ..pipelines.superres import upscale
from .batching import run_batched
from .quality import psnr_per_image, ssim


def bicubic(low: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline: bicubic upsampling (PyTorch's, a = -0.75) clamped to [-1, 1], the same
    resize the upscaler's conditioning gets (`lowres_condition`)."""
    return lowres_condition(low, (low.shape[-2] * scale, low.shape[-1] * scale))


def evaluate_superres(
    model: LoadedModel,
    *,
    n: int = 256,
    data: str | None = None,
    data_seed: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    noise_level: float = 0.0,
    batch: int = 64,
    progress: bool = False,
) -> dict:
    """PSNR / SSIM of the model's upscales and of bicubic's, on n held-out images."""
    require_task(model, "superres")
    scale = model.meta.scale
    spec = data or model.meta.data.spec
    images = held_out_images(spec, n, data_seed)
    low = downsample(images, scale)
    out, seconds = run_batched(
        lambda a, b: upscale(model, low[a:b], seed=seed + a, sampler=sampler, steps=steps,
                             noise_level=noise_level),
        n, batch, progress=progress, desc="upscaling",
    )  # fmt: skip
    base = bicubic(low, scale)
    p_model, p_base = psnr_per_image(out, images), psnr_per_image(base, images)
    s_model, s_base = ssim(out, images), ssim(base, images)
    resolved = SampleSettings(sampler=sampler, steps=steps).resolve(model)
    return {
        "n": n,
        "scale": scale,
        "data": spec,
        "data_seed": data_seed,
        "psnr_db": round(p_model.mean().item(), 3),
        "psnr_bicubic_db": round(p_base.mean().item(), 3),
        "psnr_gain_db": round((p_model - p_base).mean().item(), 3),
        "wins": round((p_model > p_base).float().mean().item(), 4),
        "ssim": round(s_model.mean().item(), 4),
        "ssim_bicubic": round(s_base.mean().item(), 4),
        "images_per_s": round(n / seconds, 3),
        "settings": {
            "sampler": resolved.sampler,
            "steps": resolved.steps,
            "noise_level": noise_level,
            "seed": seed,
        },
    }
