"""Inpainting with a dedicated `inpaint` model (SD-inpainting, Rombach et al. 2022).

The model sees the mask and the masked image (its VAE latent for latent models) concatenated
to x, so no known-region replacement is needed: the sampler runs on the model as is.
`inpaint.inpaint` hands such models here; strength, RePaint resampling and the exact,
optionally feathered paste-back work as for the training-free path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import sampling
from ..io.model_folder import LoadedModel
from ..models.conditioned import inpaint_condition, masked_image
from .generate import conditioning, plan_regions, sampling_defaults
from .img2img import batch_images, schedule_tail, start_point
from .inpaint import _positive_int, feather_mask, paste_back, prepare_masks, repaint
from .layout import Region
from .superres import require_task, with_image_cond


@torch.no_grad()
def inpaint_with_model(
    model: LoadedModel,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    negative: str | list[str] | None = None,
    num: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    guidance: float | None = None,
    guidance_interval: Sequence[float | None] | None = None,
    layout: str | None = None,
    regions: Sequence[Region] | None = None,
    strength: float = 1.0,
    resample: int = 1,
    jump: int = 1,
    feather: int = 0,
    callback: sampling.Callback = None,
    **knobs,
) -> torch.Tensor:
    """Regenerate the masked region (mask 1 = regenerate) of images (B, C, H, W) in [-1, 1]
    with an inpainting model; returns (max(B, num), C, H, W), image i seeded with `seed + i`.
    Arguments as for `inpaint.inpaint`; kept pixels equal the input exactly."""
    require_task(model, "inpaint")
    sampler, steps, guidance = sampling_defaults(model, sampler, steps, guidance)
    resample = _positive_int(resample, "resample")
    jump = _positive_int(jump, "jump")
    feather = _positive_int(feather, "feather", 0)
    images = batch_images(images, num, model.output_shape)
    n = images.shape[0]
    masks = prepare_masks(masks.to(images.device), n, images.shape[-2:])
    sigmas = schedule_tail(model, steps, strength, spacing)
    if len(sigmas) == 1 or not masks.any():
        return images.clone()
    gen = sampling.BatchGenerator(range(seed, seed + n))
    z = model.encode(images)
    x, _ = start_point(model, z, sigmas, len(sigmas) == steps + 1, gen)
    concat = inpaint_condition(masks, model.encode(masked_image(images, masks)))
    denoiser, cond = conditioning(
        model, n, labels=labels, prompts=prompts, negative=negative, guidance=guidance,
        guidance_interval=guidance_interval,
        regions=plan_regions(model, prompts, n, layout, regions),
    )  # fmt: skip
    denoiser, cond = with_image_cond(denoiser, cond, {"concat": concat})
    out = repaint(
        sampler, denoiser, x, sigmas, resample=resample, jump=jump, cond=cond, generator=gen,
        callback=callback, **knobs,
    )  # fmt: skip
    generated = model.decode(out).clamp(-1, 1)
    return paste_back(generated, images, feather_mask(masks, feather))
