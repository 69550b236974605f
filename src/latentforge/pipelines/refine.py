"""SDXL's base -> refiner hand-off (Podell et al. 2023, sec. 2.5, an ensemble of expert
denoisers): the base model runs the high-noise part of one schedule, the refiner the rest from
the base's still-noisy latents, as diffusers' `denoising_end` (base) / `denoising_start`
(refiner) do.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import sampling
from ..errors import UserError
from ..io.model_folder import LoadedModel
from .common import condition, decode, make_sigmas, precision_context
from .settings import MICRO_SCORES, SampleSettings

BASE_ONLY = ("target_size", "negative_target_size")  # the refiner's ids hold a score instead


def split_schedule(model: LoadedModel, sigmas: torch.Tensor, start: float) -> int:
    """How many steps of `sigmas` the base runs when the refiner takes over at the fraction
    `start` of the training timesteps: the steps from timesteps t >= round(T (1 - start)), as
    diffusers' `denoising_end` counts them (0 < start < 1)."""
    if not 0.0 < start < 1.0:
        raise UserError(f"the refiner's start must be in (0, 1), got {start}")
    den = model.denoiser
    if getattr(den, "train_sigmas64", None) is None:
        raise UserError("the base -> refiner hand-off needs a discrete-time (VP) model")
    cutoff = round(den.num_timesteps * (1 - start))
    t = den.sigma_to_t(sigmas[:-1].to(torch.float64))
    return int((t.round() >= cutoff).sum())


@torch.no_grad()
def generate_refined(
    base: LoadedModel,
    refiner: LoadedModel,
    settings: SampleSettings | None = None,
    *,
    prompts: list[str] | None = None,
    refiner_start: float = 0.8,
    noise: torch.Tensor | None = None,
    callback: sampling.Callback = None,
    **overrides: Any,
) -> torch.Tensor:
    """Text-to-image with the base for the first (1 - refiner_start) of the training
    timesteps and the refiner after, over one `steps`-level schedule; images in [-1, 1].

    settings / overrides: as for `generate`, resolved against the base; the refiner gets the
    same ones (its aesthetic scores, the base's target sizes dropped). The refiner decodes.
    noise: the unit noise to start from (diffusers' `latents=`), else the seeds' draw."""
    user = SampleSettings.build(settings, **overrides)
    s = user.replace(**dict.fromkeys(MICRO_SCORES)).resolve(base)
    r = user.replace(**dict.fromkeys(BASE_ONLY)).resolve(refiner)
    if base.image_shape != refiner.image_shape:
        raise UserError(
            f"the base's latents {base.image_shape} do not fit the refiner's {refiner.image_shape}"
        )
    sigmas = make_sigmas(base, s.steps, s.spacing)
    k = split_schedule(base, sigmas, refiner_start)
    gen = sampling.BatchGenerator(range(s.seed, s.seed + s.num))
    shape = (s.num, base.image_shape[0], *s.latent_size(base))
    x = sampling.prior_noise(base.denoiser, shape, float(sigmas[0]), gen, noise).to(base.device)
    for model, settings_, part in ((base, s, sigmas[: k + 1]), (refiner, r, sigmas[k:])):
        if len(part) < 2:  # no step for this expert
            continue
        denoiser, cond = condition(model, s.num, settings_, prompts=prompts)
        with precision_context(model, settings_):
            x = sampling.sample(
                s.sampler, denoiser, x.to(model.device), part, cond=cond, generator=gen,
                callback=callback, **s.knobs,
            )  # fmt: skip
    return decode(refiner, x, r)
