"""DDIM inversion round trip (`latentforge eval inversion`): image -> noise -> image.

Each image is inverted to the top noise level with deterministic DDIM (`pipelines.interpolate
.invert`) and decoded back with the same steps and conditioning (its own class or caption,
guidance 1), then scored against the original with PSNR and SSIM. The round trip is exact only
in the limit of many steps (DDIM inversion is first order), so this measures how closely the
interpolation and editing pipelines can reproduce their end frames at a given step count.
"""

from __future__ import annotations

import torch

from ..io.model_folder import LoadedModel
from ..pipelines.common import require_task
from ..pipelines.interpolate import decode_noise, invert
from .batching import run_batched
from .quality import psnr_per_image, ssim


def evaluate_inversion(
    model: LoadedModel,
    *,
    n: int = 64,
    steps: int = 50,
    data: str | None = None,
    data_seed: int = 1,
    spacing: str | None = None,
    batch: int = 64,
    progress: bool = False,
) -> dict:
    """Mean PSNR / SSIM of the round trip over the first n images of the data spec (default:
    the model's own) on stream `data_seed` (shapes; digits and folders have one fixed set)."""
    from ..data import load_dataset

    require_task(model, "generate")
    spec = data or model.meta.data.spec
    ds = load_dataset(spec, seed=data_seed, resolution=model.output_shape[-1])
    n = min(n, len(ds))
    items = [ds[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    cond: dict = {}
    if model.num_classes:
        cond["labels"] = [it["label"] for it in items]
    if model.conditioning == "text":
        cond["prompts"] = [it["caption"] for it in items]

    def round_trip(start: int, stop: int) -> torch.Tensor:
        part = {k: v[start:stop] for k, v in cond.items()}
        x_T = invert(model, images[start:stop], steps=steps, spacing=spacing, **part)
        return decode_noise(model, x_T, steps=steps, spacing=spacing, **part)

    out, seconds = run_batched(round_trip, n, batch, progress=progress, desc="inverting")
    psnr = psnr_per_image(out, images)
    return {
        "n": n,
        "steps": steps,
        "data": spec,
        "data_seed": data_seed,
        "conditioning": sorted(cond) or ["none"],
        "psnr_db": round(psnr.mean().item(), 3),
        "psnr_min_db": round(psnr.min().item(), 3),
        "ssim": round(ssim(out, images).mean().item(), 4),
        "images_per_s": round(n / seconds, 3),
    }
