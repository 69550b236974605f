"""Whole text2img pipeline: diffusers' StableDiffusionPipeline against latentforge's `generate`.

The tiny random SD folder of conftest.py (`sd_folder`) runs in diffusers, and imported
(`native`) in latentforge, from the same unit noise (diffusers' `latents=`, our `noise=`), 4 steps,
guidance 6, with and without a negative prompt, on a 32 px canvas; the decoded images, in
[-1, 1], agree to 1e-4, and both make one batched (uncond + cond) U-Net call per step.

How the two configure the same sampler (tests/test_scheduler_conformance.py checks the update
rules themselves):

* SD's scheduler config has `timestep_spacing="leading"` with `steps_offset=1`: t = 751, 501,
  251, 1 for 4 steps, which is our "leading" spacing (the imported model's default too).
* DDIMScheduler (eta 0) is our "ddim"; its samples are VP (x_t = sqrt(alpha_bar) x_VE) and it
  starts at `latents` * init_noise_sigma = latents, i.e. at x_VE = latents * sqrt(1 + sigma_max^2),
  which is how `noise` is scaled.
* EulerDiscreteScheduler from the same config is our "euler": sigmas at the same timesteps, then
  0; under leading spacing init_noise_sigma = sqrt(1 + sigma_max^2) (sigma_max itself under
  linspace / trailing, which would need a different start).
* SD's config has `set_alpha_to_one=False` (as the CompVis DDIM sampler): diffusers' last DDIM
  step goes to alpha_bar[0] (t = 0, sigma = 0.029), not to alpha_bar = 1, so its latents keep
  noise of std sqrt(1 - alpha_bar[0]) and its images differ from a step to sigma = 0 by ~1e-2.
  latentforge's samplers end at sigma = 0 (diffusers' own default `set_alpha_to_one=True`), so
  the generate comparison uses True; `test_stock_sd_ddim_final_step` shows that the stock
  config is reproduced exactly by generate's own pieces with the last level at sigma(t = 0).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from latentforge.errors import UserError  # noqa: E402
from latentforge.io.model_folder import load_diffusion_model  # noqa: E402
from latentforge.pipelines.generate import generate  # noqa: E402

PROMPT, NEGATIVE = "a red cat", "blurry, low quality"
STEPS, GUIDANCE = 4, 6.0
TOL = 1e-4


@pytest.fixture(scope="module")
def pipe(sd_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_config(sd_folder):
    """The folder's own scheduler config (SD's), whatever scheduler a test gave `pipe`."""
    return diffusers.DDIMScheduler.from_pretrained(sd_folder, subfolder="scheduler").config


@pytest.fixture(scope="module")
def model(native):
    """The imported model on a 32 px canvas (16x16 latents) rather than its 64 px: the U-Net and
    VAE are convolutional, diffusers gets the same size by height= / width=, and the U-Net's
    full-resolution self-attention over 1024 tokens would make every case ~5x slower on CPU."""
    model = load_diffusion_model(native)
    data, latent = model.meta.data, model.meta.latent
    assert (data.resolution, latent.image_resolution) == (32, 64)  # what the import wrote
    model.meta = model.meta.replace(
        data=dataclasses.replace(data, resolution=16),
        latent=dataclasses.replace(latent, image_resolution=32),
    )
    return model


@pytest.fixture(scope="module")
def noise(model):
    return torch.randn((1, *model.image_shape), generator=torch.Generator().manual_seed(123))


@contextmanager
def _unet_batches(module: torch.nn.Module):
    """The batch size of every forward call of `module` while inside."""
    batches: list[int] = []
    handle = module.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    try:
        yield batches
    finally:
        handle.remove()


def _diffusers(pipe, scheduler, negative: str | None, noise: torch.Tensor):
    """diffusers' images in [-1, 1] and its U-Net calls' batch sizes."""
    pipe.scheduler = scheduler
    size = noise.shape[-1] * pipe.vae_scale_factor
    with _unet_batches(pipe.unet) as calls:
        images = pipe(
            PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            eta=0.0, latents=noise.clone(), height=size, width=size, output_type="pt",
        ).images  # fmt: skip
    return images * 2 - 1, calls  # output_type="pt" is (decoded / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def ours(model, noise):
    """run(sampler, negative) -> generate's images, its U-Net calls' batch sizes and its last
    step (sigma, x, x0 estimate); each run once per module."""
    cache: dict = {}

    def run(sampler: str, negative: str | None):
        if (sampler, negative) not in cache:
            steps = []

            def keep(i, sigma, x, denoised):
                steps.append((float(sigma), x, denoised))

            with _unet_batches(model.denoiser.model) as calls:
                images = generate(
                    model, prompts=[PROMPT], negative=negative, num=1, steps=STEPS,
                    guidance=GUIDANCE, sampler=sampler, spacing="leading", noise=noise,
                    callback=keep,
                )  # fmt: skip
            cache[sampler, negative] = images, calls, steps[-1]
        return cache[sampler, negative]

    return run


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-negative", "negative"])
@pytest.mark.parametrize(
    ("sampler", "scheduler_cls", "overrides"),
    [
        ("ddim", diffusers.DDIMScheduler, {"set_alpha_to_one": True}),  # see the module docstring
        ("euler", diffusers.EulerDiscreteScheduler, {}),
    ],
    ids=["ddim", "euler"],
)
def test_text2img_matches_diffusers(
    pipe, sd_config, model, noise, ours, sampler, scheduler_cls, overrides, negative
):
    scheduler = scheduler_cls.from_config(sd_config, **overrides)
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1
    want, ref_calls = _diffusers(pipe, scheduler, negative, noise)
    assert scheduler.timesteps.tolist() == [751, 501, 251, 1]
    assert model.defaults.spacing == "leading"  # the import kept SD's spacing
    got, calls, _ = ours(sampler, negative)
    assert got.shape == want.shape == (1, 3, 32, 32)
    assert calls == ref_calls == [2] * STEPS  # one batched uncond + cond call per step
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)


def test_stock_sd_ddim_final_step(pipe, sd_config, model, noise, ours):
    """SD's DDIM as configured (set_alpha_to_one=False) is generate's ddim up to the last step,
    which goes from t = 1 to sigma(t = 0) instead of 0: the same DDIM (eta 0) step,
    x + (x - D) (sigma_0 / sigma - 1), then VE -> VP coordinates (what diffusers decodes)."""
    scheduler = diffusers.DDIMScheduler.from_config(sd_config)
    assert scheduler.config.set_alpha_to_one is False
    want, _ = _diffusers(pipe, scheduler, NEGATIVE, noise)
    images, _, (sigma, x, denoised) = ours("ddim", NEGATIVE)
    sigma_0 = model.denoiser.sigma_min  # alpha_bar[0] = 1 / (1 + sigma_0^2), sigma_0 = 0.029
    assert abs(1 / (1 + sigma_0**2) - float(scheduler.final_alpha_cumprod)) < 1e-7
    last = denoised + (x - denoised) * (sigma_0 / sigma)
    got = model.decode(last / math.sqrt(1 + sigma_0**2))
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)
    assert _max_diff(images, want) > 10 * TOL  # the step to sigma = 0: a visibly other image


def test_noise_keyword(model, noise):
    """noise= is the unit noise the seed would draw; a wrong shape is a UserError."""
    kwargs = {"prompts": [PROMPT], "steps": 1, "guidance": 1.0, "sampler": "euler"}
    drawn = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(generate(model, seed=5, **kwargs), generate(model, noise=drawn, **kwargs))
    with pytest.raises(UserError, match="noise has shape"):
        generate(model, num=2, noise=noise, **kwargs)


@pytest.mark.parametrize(("width", "height"), [(48, 32), (32, 48)])
def test_non_square_sizes_match_diffusers(pipe, sd_config, model, width, height):
    """width / height: the latents are (height / 8, width / 8) of SD's f=8 VAE (here f=2), the
    same image as diffusers' height= / width= from the same initial latents."""
    f = model.output_shape[-1] // model.image_shape[-1]
    noise = torch.randn(
        (1, model.image_shape[0], height // f, width // f),
        generator=torch.Generator().manual_seed(7),
    )
    pipe.scheduler = diffusers.DDIMScheduler.from_config(sd_config, set_alpha_to_one=True)
    want = pipe(
        PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
        latents=noise.clone(), height=height, width=width, output_type="pt",
    ).images * 2 - 1  # fmt: skip
    got = generate(
        model, prompts=[PROMPT], steps=STEPS, guidance=GUIDANCE, sampler="ddim",
        spacing="leading", noise=noise, width=width, height=height,
    )  # fmt: skip
    assert got.shape == want.shape == (1, 3, height, width)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)
