"""Load a model folder and sample images from it: the one text2img/class2img composition.

encode conditioning -> prior noise -> sampler (any registered one) -> images in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import sampling
from ..errors import UserError
from ..io.embeddings import load_embeddings
from ..io.lora import load_model_with_loras
from ..io.model_folder import LoadedModel, load_diffusion_model
from ..io.model_folder import model_dir as named_model_dir
from .common import decode, describe_conditioning, make_sigmas, precision_context
from .control import Control, ControlRequest, condition
from .refine import generate_refined
from .settings import SampleSettings


@torch.no_grad()
def generate(
    model: LoadedModel,
    settings: SampleSettings | None = None,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    callback: sampling.Callback = None,
    noise: torch.Tensor | None = None,
    controls: Sequence[Control] = (),
    **overrides: Any,
) -> torch.Tensor:
    """Sample `settings.num` images (B, C, H, W) in [-1, 1]; image i uses seed `seed + i`.

    settings: a `SampleSettings` (None: the model's defaults); keyword arguments override its
    fields (sampler, steps, spacing, guidance, guidance_interval, negative, layout, regions,
    seed, num, bf16) and any other keyword is a sampler knob (eta=0.5), so
    `generate(model, prompts=["a red circle"], num=4, steps=10)` reads as it says.
    labels (class models) / prompts (text models): one per image or one for all; guidance != 1
    applies classifier-free guidance against the null class / the negative prompt, at the noise
    levels inside guidance_interval (default: the model's; see `common.conditioning`).
    layout (text models): the planner that reads regions from each prompt ("shapes", "none";
    default: the model's `sampling.layout`); regions: one region list for every image, which
    replaces the planner's (see `pipelines/layout.py`).
    noise: unit Gaussian noise (num, C, h, w) at the latent size, to start from instead of the
    seeds' draw (the seeds still drive stochastic samplers); it is scaled to the prior std as
    drawn noise is. For an imported SD model it is what diffusers' pipelines take as `latents=`
    (with DDIM, or Euler under leading spacing: tests/test_sd_pipeline.py).
    controls: ControlNets with their control images (`pipelines.control.Control`).
    bf16 (precision "bf16"): run the denoiser and the decoder under bf16 autocast (the text
    encoder, the noise and the sampler's arithmetic stay fp32). About 1.5x the images/s on a CPU
    with AVX512-BF16 or AMX (docs/text-to-image.md); CPUs without bf16 units emulate it slowly.
    The images differ from fp32 ones by bf16 rounding, and are as deterministic.
    """
    s = SampleSettings.build(settings, **overrides).resolve(model)
    sigmas = make_sigmas(model, s.steps, s.spacing)
    gen = sampling.BatchGenerator(range(s.seed, s.seed + s.num))
    shape = (s.num, model.image_shape[0], *s.latent_size(model))
    # drawn on the CPU and moved: a seed gives the same noise on every device
    x = sampling.prior_noise(model.denoiser, shape, float(sigmas[0]), gen, noise)
    x = x.to(model.device)
    denoiser, cond = condition(model, s.num, s, controls, sigmas, labels=labels, prompts=prompts)
    with precision_context(model, s):
        out = sampling.sample(
            s.sampler, denoiser, x, sigmas, cond=cond, generator=gen, callback=callback, **s.knobs
        )
    return decode(model, out, s)


# ----- the CLI's generate: PNG in, PNG out, parameters in the PNG's text chunks -----------------
def generate_to_png(
    model_dir: str | Path | None,
    out: str | Path,
    *,
    prompt: str = "",
    preview: str | Path | None = None,
    settings: SampleSettings | None = None,
    callback: sampling.Callback = None,
    device: str | None = "cpu",
    dtype: str = "fp32",
    embeddings: Sequence[str] = (),
    embeddings_dir: str | Path | None = None,
    control: ControlRequest | None = None,
    refiner: str | Path | None = None,
    refiner_start: float = 0.8,
    **overrides: Any,
) -> dict:
    """Generate, write a grid PNG whose text chunks hold the prompt and the resolved settings
    (so `--from-png` reproduces it bit-exactly), and optionally a GIF with, at every step, the
    noisy state (first row) and the x0 estimate (second row), decoded. callback: called at
    every step after the preview's frame (the CLI's progress bar). settings.loras: LoRA files
    (FILE[:SCALE]) fused into the model, recorded as NAME:SCALE. embeddings / embeddings_dir:
    textual-inversion files (`io.embeddings.load_embeddings`; the model's embeddings/ folder
    by default). control: ControlNets and control images, recorded as JSON in the
    "controlnets" chunk (names, hashes, scales; the images are not stored, so --from-png
    does not bring them back). refiner: an SDXL refiner folder that takes over at
    `refiner_start` of the schedule (`refine.generate_refined`), recorded in the PNG (not read
    back by --from-png). overrides: as for `generate`."""
    import json

    from ..io.images import save_grid

    s = SampleSettings.build(settings, **overrides)
    model, labels = load_model_with_loras(model_dir, s.loras, device=device, dtype=dtype)
    load_embeddings(model, embeddings, embeddings_dir)
    cond_kwargs, what = describe_conditioning(model, prompt or "")
    # stored resolved, so --from-png reproduces it whatever the model's default
    s = s.replace(loras=tuple(labels)).resolve(model)
    frames: list[torch.Tensor] = []

    def each_step(step, sigma, x, denoised):
        if preview:
            # the noisy state (shown as x_t = x / sqrt(1 + sigma^2)) beside the x0 estimate
            noisy = model.decode(x / (1 + sigma**2).sqrt()).clamp(-1, 1)
            frames.append(torch.cat([noisy, model.decode(denoised).clamp(-1, 1)]))
        if callback is not None:
            callback(step, sigma, x, denoised)

    steps_cb = each_step if preview or callback is not None else None
    controls, records = control.build(model) if control is not None else ([], [])
    if refiner is None:
        images = generate(model, s, **cond_kwargs, callback=steps_cb, controls=controls)
    else:
        if controls or preview:
            raise UserError("--refiner takes no --control and no --preview")
        expert = load_diffusion_model(refiner, device=device, dtype=dtype)
        images = generate_refined(model, expert, s, **cond_kwargs, refiner_start=refiner_start,
                                  callback=steps_cb)  # fmt: skip
    meta = {
        "prompt": prompt or "", **s.to_png_meta(), "model": model.sha256,
        "model_path": "" if model_dir is None else str(named_model_dir(model_dir).resolve()),
    }  # fmt: skip
    if records:
        meta["controlnets"] = json.dumps(records)
    if refiner is not None:
        meta["refiner"] = json.dumps({"path": str(refiner), "start": refiner_start})
    save_grid(images, out, **meta)
    if preview:
        from ..io.images import save_gif

        save_gif([*frames, torch.cat([images, images])], preview)
    return {"num": s.num, "conditioning": what, **meta}


def settings_from_png(path: str | Path) -> tuple[str, SampleSettings, str | None]:
    """(prompt, settings, the model folder it names or None) from a PNG `generate` wrote."""
    from ..io.images import read_png_metadata

    text = read_png_metadata(path)
    settings = SampleSettings.from_png_meta(text, str(path))
    return text.get("prompt", ""), settings, text.get("model_path") or None
