"""Training-free inpainting with any model and any sampler.

The known region is imposed through the denoiser, not the sampler: `KnownRegionDenoiser`
replaces the known part of x by image + sigma * eps (one fixed eps per image, so the known
region follows one consistent noisy trajectory) before calling D, and returns the known pixels
as the x0 estimate there (the "replacement" method of Song et al. 2021 / Lugmayr et al. 2022).
Every registered sampler then works unchanged. RePaint's resampling (Lugmayr et al. 2022,
Alg. 1) harmonises the seam: after `jump` steps, noise x back up to the earlier level with fresh
noise and redo those steps, `resample` times in all. The result is pasted back in pixel space,
so kept pixels equal the input exactly, even for latent models whose VAE is lossy.

A dedicated inpainting model (`task: inpaint`, SD-inpainting, Rombach et al. 2022) sees the
mask and the masked image (its VAE latent for latent models) concatenated to x instead, so no
known-region replacement is needed: `inpaint` decides which of the two ways the known region
is handled, and everything else (strength, resampling, the paste-back) is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import sampling
from ..errors import UserError
from ..guidance import KnownRegionDenoiser
from ..io.model_folder import LoadedModel
from ..models.conditioned import inpaint_condition, masked_image
from .common import (
    batch_images,
    decode,
    on_device,
    precision_context,
    schedule_tail,
    start_point,
    with_image_cond,
)
from .control import Control, condition
from .settings import SampleSettings


def prepare_masks(masks: torch.Tensor, n: int, size: tuple[int, int]) -> torch.Tensor:
    """(H, W), (B, H, W) or (B, 1, H, W) with 1 = regenerate -> (n, 1, H, W) float in {0, 1}
    (values above 0.5 regenerate)."""
    masks = masks.float()
    if masks.ndim == 2:
        masks = masks[None, None]
    elif masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise UserError(f"mask must be (H, W), (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}")
    if tuple(masks.shape[-2:]) != tuple(size):
        raise UserError(f"mask is {tuple(masks.shape[-2:])}, the images are {tuple(size)}")
    if masks.shape[0] not in (1, n):
        raise UserError(f"got {masks.shape[0]} masks for {n} images")
    return (masks > 0.5).float().expand(n, 1, *size)


def feather_mask(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """Blend weights that ramp linearly from 1/(feather+1) at the mask's edge to 1 at `feather`
    pixels inside it: the mean of `feather` successive 3x3 erosions (a box-blur falloff kept
    inside the mask, so it is exactly 0 wherever the mask is 0). The image border is not an
    edge: max_pool2d pads with -inf, so pixels outside count as masked."""
    acc, cur = mask.clone(), mask
    for _ in range(feather):
        cur = 1 - F.max_pool2d(1 - cur, 3, stride=1, padding=1)
        acc = acc + cur
    return acc / (feather + 1)


def paste_back(
    generated: torch.Tensor, images: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """weights * generated + (1 - weights) * images, and exactly `images` where weights == 0."""
    blend = weights * generated + (1 - weights) * images
    return torch.where(weights > 0, blend, images)


def repaint(
    sampler: str,
    denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    resample: int = 1,
    jump: int = 1,
    cond: dict | None = None,
    generator: sampling.Generator = None,
    callback: sampling.Callback = None,
    **knobs,
) -> torch.Tensor:
    """RePaint resampling around any sampler (Lugmayr et al. 2022, Alg. 1 with jump length):
    run `jump` steps (one `sampling.sample` call on that segment of sigmas), then noise back up
    from sigma_b to sigma_a with fresh noise of std sqrt(sigma_a^2 - sigma_b^2) and redo the
    segment; each segment runs `resample` times. resample=1 is one plain sampler call.
    Callback steps are indices into `sigmas` (repeated steps repeat their index)."""
    if resample == 1:
        return sampling.sample(
            sampler, denoiser, x, sigmas, cond=cond, generator=generator, callback=callback,
            **knobs,
        )  # fmt: skip
    steps = len(sigmas) - 1
    for a in range(0, steps, jump):
        b = min(a + jump, steps)
        cb = None
        if callback:

            def cb(i, sigma, x, denoised, a=a):
                callback(i + a, sigma, x, denoised)

        for r in range(resample):
            if r:
                up = float((sigmas[a] ** 2 - sigmas[b] ** 2).sqrt())
                x = x + sampling.randn_like(x, generator) * up
            x = sampling.sample(
                sampler, denoiser, x, sigmas[a : b + 1], cond=cond, generator=generator,
                callback=cb, **knobs,
            )  # fmt: skip
    return x


def _positive_int(value: int, what: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


@torch.no_grad()
def inpaint(
    model: LoadedModel,
    images: torch.Tensor,
    masks: torch.Tensor,
    settings: SampleSettings | None = None,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    strength: float = 1.0,
    resample: int = 1,
    jump: int = 1,
    feather: int = 0,
    callback: sampling.Callback = None,
    controls: Sequence[Control] = (),
    **overrides: Any,
) -> torch.Tensor:
    """Regenerate the masked region (mask 1 = regenerate, 0 = keep) of images (B, C, H, W) in
    [-1, 1]; returns (max(B, num), C, H, W), image i seeded with `seed + i`.

    Kept pixels equal the input exactly. `feather` > 0 softens the seam over that many pixels
    inside the mask. `strength` < 1 starts the masked region from the noised input (SDEdit)
    instead of pure noise. `resample` / `jump`: RePaint resampling (see `repaint`).
    settings / keyword overrides: as for `generate`; regional prompting (the model's layout
    by default) lets a prompt naming the kept object and the new one draw each in its box.
    A `task: inpaint` model gets the mask and the masked image as inputs; any other model is
    inpainted training-free through `KnownRegionDenoiser`. controls: ControlNets
    (`pipelines.control`), whose start / end count the steps that run.
    """
    s = SampleSettings.build(settings, **overrides).resolve(model)
    resample = _positive_int(resample, "resample")
    jump = _positive_int(jump, "jump")
    feather = _positive_int(feather, "feather", 0)
    images = on_device(
        model, batch_images(images, s.num, (model.output_shape[0], s.height, s.width))
    )
    n = images.shape[0]
    masks = prepare_masks(masks.to(images.device), n, images.shape[-2:])
    sigmas = schedule_tail(model, s.steps, strength, s.spacing)
    if len(sigmas) == 1 or not masks.any():
        return images.cpu().clone()
    gen = sampling.BatchGenerator(range(s.seed, s.seed + n))
    z = model.encode(images)
    x, eps = start_point(model, z, sigmas, len(sigmas) == s.steps + 1, gen)
    denoiser, cond = condition(model, n, s, controls, sigmas, labels=labels, prompts=prompts)
    if model.task == "inpaint":  # the model sees the mask and the masked image
        concat = inpaint_condition(masks, model.encode(masked_image(images, masks)))
        denoiser, cond = with_image_cond(denoiser, cond, {"concat": concat})
    else:  # training-free: the known region is imposed through the denoiser
        # a latent cell is regenerated if any pixel it covers is (max-pool the mask down)
        keep = F.adaptive_max_pool2d(masks, z.shape[-2:]) == 0  # (n, 1, h, w)
        denoiser = KnownRegionDenoiser(denoiser, z, keep, eps)
    with precision_context(model, s):
        out = repaint(
            s.sampler, denoiser, x, sigmas, resample=resample, jump=jump, cond=cond,
            generator=gen, callback=callback, **s.knobs,
        )  # fmt: skip
    generated = decode(model, out, s)
    return paste_back(generated, images.cpu(), feather_mask(masks, feather).cpu())
