"""img2img / sketch-to-image: SDEdit (Meng et al. 2022).

Noise the input to an intermediate level sigma_start, then denoise with any registered sampler
over the tail of the usual schedule. `strength` picks how much of the schedule runs: the full
`steps`-level schedule is built and only its last round(strength * steps) intervals are kept,
so a second-order (heun) or multistep (dpmpp_2m) sampler sees exactly the noise levels it
would see in text-to-image, and runs round(strength * steps) steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import sampling
from ..io.model_folder import LoadedModel
from .common import (
    batch_images,
    decode,
    on_device,
    precision_context,
    schedule_tail,
    start_point,
)
from .control import Control, condition
from .settings import SampleSettings


@torch.no_grad()
def img2img(
    model: LoadedModel,
    images: torch.Tensor,
    settings: SampleSettings | None = None,
    *,
    strength: float,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    callback: sampling.Callback = None,
    controls: Sequence[Control] = (),
    **overrides: Any,
) -> torch.Tensor:
    """SDEdit: images (B, C, H, W) in [-1, 1] -> edited images (max(B, num), C, H, W).

    Image i is noised with seed `seed + i` to the level where round(strength * steps) steps of
    the full schedule remain, then denoised by `sampler` over those steps. strength 0 returns
    the input unchanged (no model call); strength 1 is `generate` with the same seed.
    settings / keyword overrides: as for `generate` (regional prompting included); controls:
    ControlNets (`pipelines.control`), whose start / end count the steps that run.
    """
    s = SampleSettings.build(settings, **overrides).resolve(model)
    images = on_device(
        model, batch_images(images, s.num, (model.output_shape[0], s.height, s.width))
    )
    sigmas = schedule_tail(model, s.steps, strength, s.spacing)
    if len(sigmas) == 1:  # nothing to run: the input, exactly
        return images.cpu().clone()
    n = images.shape[0]
    gen = sampling.BatchGenerator(range(s.seed, s.seed + n))
    z = model.encode(images)
    x, _ = start_point(model, z, sigmas, len(sigmas) == s.steps + 1, gen)
    denoiser, cond = condition(model, n, s, controls, sigmas, labels=labels, prompts=prompts)
    with precision_context(model, s):
        out = sampling.sample(
            s.sampler, denoiser, x, sigmas, cond=cond, generator=gen, callback=callback, **s.knobs
        )
    return decode(model, out, s)
