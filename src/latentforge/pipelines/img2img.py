"""img2img / sketch-to-image: SDEdit (Meng et al. 2022).

Noise the input to an intermediate level sigma_start, then denoise with any registered sampler
over the tail of the usual schedule. `strength` picks how much of the schedule runs: the full
`steps`-level schedule is built and only its last round(strength * steps) intervals are kept,
so a second-order (heun) or multistep (dpmpp_2m) sampler sees exactly the noise levels it
would see in text-to-image, and runs round(strength * steps) steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import sampling
from ..errors import UserError
from ..io.model_folder import LoadedModel
from .generate import conditioning, make_sigmas, plan_regions, sampling_defaults
from .layout import Region


def schedule_tail(
    model: LoadedModel, steps: int, strength: float, spacing: str | None = None
) -> torch.Tensor:
    """The last round(strength * steps) intervals of the full schedule: sigmas[steps - k:]
    (k + 1 levels, ending in 0; a single 0 when k == 0)."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be in [0, 1], got {strength}")
    k = round(strength * steps)
    return make_sigmas(model, steps, spacing)[steps - k :]


def start_point(
    model: LoadedModel, z: torch.Tensor, sigmas: torch.Tensor, full: bool, gen: sampling.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at sigmas[0], the unit noise eps in it): SDEdit's x = z + sigma_start * eps.

    `full` (the whole schedule runs): the prior exactly as `generate` draws it (same draws from
    the same generator), so strength 1 is text-to-image bit for bit; z is not used.
    """
    sigma = float(sigmas[0])
    if full:
        x = sampling.prior_noise(model.denoiser, z.shape, sigma, gen).to(z)
        return x, x / _prior_scale(model, sigma)
    eps = sampling.randn_like(torch.empty(z.shape), gen).to(z)
    return z + sigma * eps, eps


def _prior_scale(model: LoadedModel, sigma: float) -> float:
    den = model.denoiser
    return den.prior_scale(sigma) if hasattr(den, "prior_scale") else sigma


def batch_images(images: torch.Tensor, num: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) in the model's output shape -> a batch of max(B, num): one
    image is repeated for num seeds; B > 1 images need num 1 or num == B."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise UserError(
            f"images must be (B, {', '.join(map(str, shape))}) for this model, "
            f"got {tuple(images.shape)}"
        )
    if num < 1:
        raise UserError(f"num must be >= 1, got {num}")
    B = images.shape[0]
    if B > 1 and num not in (1, B):
        raise UserError(f"got {B} images and num={num}; give one image or num equal to {B}")
    return images.expand(max(B, num), *shape).float()


@torch.no_grad()
def img2img(
    model: LoadedModel,
    images: torch.Tensor,
    *,
    strength: float,
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
    callback: sampling.Callback = None,
    **knobs,
) -> torch.Tensor:
    """SDEdit: images (B, C, H, W) in [-1, 1] -> edited images (max(B, num), C, H, W).

    Image i is noised with seed `seed + i` to the level where round(strength * steps) steps of
    the full schedule remain, then denoised by `sampler` over those steps. strength 0 returns
    the input unchanged (no model call); strength 1 is `generate` with the same seed.
    `layout` / `regions`: regional prompting, as for `generate` (the model's layout by default).
    """
    sampler, steps, guidance = sampling_defaults(model, sampler, steps, guidance)
    images = batch_images(images, num, model.output_shape)
    sigmas = schedule_tail(model, steps, strength, spacing)
    if len(sigmas) == 1:  # nothing to run: the input, exactly
        return images.clone()
    n = images.shape[0]
    gen = sampling.BatchGenerator(range(seed, seed + n))
    z = model.encode(images)
    x, _ = start_point(model, z, sigmas, len(sigmas) == steps + 1, gen)
    denoiser, cond = conditioning(
        model, n, labels=labels, prompts=prompts, negative=negative, guidance=guidance,
        guidance_interval=guidance_interval,
        regions=plan_regions(model, prompts, n, layout, regions),
    )  # fmt: skip
    out = sampling.sample(
        sampler, denoiser, x, sigmas, cond=cond, generator=gen, callback=callback, **knobs
    )
    return model.decode(out).clamp(-1, 1)
