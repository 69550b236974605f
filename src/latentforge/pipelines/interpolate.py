"""Interpolation between images (DDIM inversion) and latent walks between seeds.

`invert` integrates the probability-flow ODE upwards, from the lowest noise level of the
schedule to the highest, with the DDIM (= Euler in sigma) update: `sampling.sample("ddim")`
over the ascending levels, since x <- x + (x - D(x, sigma_i)) / sigma_i * (sigma_{i+1} - sigma_i)
is the same formula in either direction (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021,
app. F). The image stands in for x at the lowest level (the step from sigma = 0 to sigma_min
moves x by O(sigma_min^2)). Decoding runs DDIM down over the same levels, so invert + decode
reconstructs the image up to the discretisation error of the ODE solver.

Conditioning between two classes / prompts cannot be interpolated as embeddings through the
denoiser contract (a class model embeds integer labels inside the network), so frame t uses
the mixed denoiser (1 - t) D(x | cond_a) + t D(x | cond_b), one batched forward (the same
linear blend classifier-free guidance uses). Frames at t = 0 and t = 1 use one condition only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import sampling
from ..errors import UserError
from ..guidance import DenoiserWrapper
from ..io.model_folder import LoadedModel
from .common import (
    batch_images,
    conditioning,
    decode,
    make_sigmas,
    on_device,
    precision_context,
)
from .settings import SampleSettings

ODE_SAMPLER = "ddim"  # eta defaults to 0: deterministic, and invertible step for step


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) between rows of a and b (B, ...), the
    angle taken over all non-batch dims; t is a float or (B,). Exact at t = 0 and t = 1;
    linear interpolation where a and b are (nearly) parallel."""
    a64, b64 = a.flatten(1).double(), b.flatten(1).double()  # (B, D)
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device).reshape(-1, 1)  # (B or 1, 1)
    norms = a64.norm(dim=1, keepdim=True) * b64.norm(dim=1, keepdim=True)  # (B, 1)
    cos = (a64 * b64).sum(1, keepdim=True) / norms.clamp(min=1e-30)
    theta = cos.clamp(-1, 1).acos()
    sin = theta.sin()
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - t, ((1 - t) * theta).sin() / safe)
    wb = torch.where(parallel, t, (t * theta).sin() / safe)
    return (wa * a64 + wb * b64).reshape(torch.broadcast_shapes(a.shape, b.shape)).to(a.dtype)


class MixedCondDenoiser(DenoiserWrapper):
    """(1 - w_i) D(x_i | cond_a) + w_i D(x_i | cond_b) per image i, in one batched forward."""

    def __init__(self, denoiser: nn.Module, cond_a: dict, cond_b: dict, weights: torch.Tensor):
        super().__init__(denoiser)
        self.cond_a, self.cond_b, self.weights = cond_a, cond_b, weights

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        both = {k: torch.cat([self.cond_a[k], self.cond_b[k]]) for k in self.cond_a}
        d_a, d_b = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        w = self.weights.to(x).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return (1 - w) * d_a + w * d_b  # exactly d_a at w = 0 and d_b at w = 1


def _mixed_conditioning(
    model: LoadedModel,
    weights: torch.Tensor,
    guidance: float,
    labels: list,
    prompts: list,
    interval: Sequence[float | None] | None = None,
) -> tuple[nn.Module, dict]:
    """The denoiser and cond for frames blending condition a (labels[0], prompts[0]) into
    condition b; a single condition when the two are the same."""
    n = len(weights)
    if labels[0] == labels[1] and prompts[0] == prompts[1]:
        return conditioning(model, n, labels=labels[:1], prompts=prompts[:1], guidance=guidance,
                            guidance_interval=interval)  # fmt: skip
    # 2n rows (n of a, then n of b), so a CFG wrapper's unconditional rows match the batch
    denoiser, cond = conditioning(
        model, 2 * n, labels=[labels[0]] * n + [labels[1]] * n,
        prompts=[prompts[0]] * n + [prompts[1]] * n, guidance=guidance, guidance_interval=interval,
    )  # fmt: skip
    if not cond:  # an unconditional model: nothing to blend
        return denoiser, {}
    cond_a = {k: v[:n] for k, v in cond.items()}
    cond_b = {k: v[n:] for k, v in cond.items()}
    return MixedCondDenoiser(denoiser, cond_a, cond_b, weights), {}


def _check_frames(frames: int) -> None:
    if not isinstance(frames, int) or frames < 2:
        raise UserError(f"frames must be an integer >= 2, got {frames!r}")


def _ode_settings(
    model: LoadedModel, settings: SampleSettings | None, overrides: dict, sampler: str | None
) -> SampleSettings:
    """Resolved settings for the deterministic paths: guidance 1 unless asked (inversion is
    exact only without it), and `sampler` (the ODE sampler) unless one is given."""
    s = SampleSettings.build(settings, **overrides)
    if s.guidance is None:
        s = s.replace(guidance=1.0)
    if sampler is not None and s.sampler is None:
        s = s.replace(sampler=sampler)
    return s.resolve(model)


@torch.no_grad()
def invert(
    model: LoadedModel,
    images: torch.Tensor,
    settings: SampleSettings | None = None,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    callback: sampling.Callback = None,
    **overrides: Any,
) -> torch.Tensor:
    """Deterministic DDIM inversion: images (B, C, H, W) in [-1, 1] -> x at the schedule's top
    level (what DDIM with the same steps / spacing / conditioning decodes back to the images).
    Guidance other than 1 is allowed but makes the inversion inexact. The sampler is always
    DDIM (the step that inverts step for step)."""
    s = _ode_settings(model, settings, overrides, ODE_SAMPLER)
    images = on_device(model, batch_images(images, 1, model.output_shape))
    upward = make_sigmas(model, s.steps, s.spacing)[:-1].flip(0)  # sigma_min ... sigma_max
    denoiser, cond = conditioning(
        model, images.shape[0], labels=labels, prompts=prompts, guidance=s.guidance,
        guidance_interval=s.guidance_interval,
    )  # fmt: skip
    z = model.encode(images)
    with precision_context(model, s):
        return sampling.sample(ODE_SAMPLER, denoiser, z, upward, cond=cond, callback=callback)


@torch.no_grad()
def decode_noise(
    model: LoadedModel,
    x: torch.Tensor,
    settings: SampleSettings | None = None,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    callback: sampling.Callback = None,
    **overrides: Any,
) -> torch.Tensor:
    """The inverse of `invert`: DDIM (or the settings' sampler) from x at the top level down
    to images in [-1, 1]."""
    s = _ode_settings(model, settings, overrides, ODE_SAMPLER)
    sigmas = make_sigmas(model, s.steps, s.spacing)
    denoiser, cond = conditioning(
        model, x.shape[0], labels=labels, prompts=prompts, guidance=s.guidance,
        guidance_interval=s.guidance_interval,
    )  # fmt: skip
    x = on_device(model, x)
    with precision_context(model, s):
        out = sampling.sample(s.sampler, denoiser, x, sigmas, cond=cond, callback=callback)
    return decode(model, out, s)


def _walk_frames(
    model: LoadedModel,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    frames: int,
    sigmas: torch.Tensor,
    s: SampleSettings,
    labels: list,
    prompts: list,
    callback: sampling.Callback,
) -> torch.Tensor:
    """Slerp x_a -> x_b (each (1, ...)) over `frames` steps and sample every frame with the
    deterministic sampler of `s`, conditioning blended a -> b; returns (frames, C, H, W)."""
    t = torch.linspace(0, 1, frames, dtype=torch.float64, device=x_a.device)
    x = slerp(x_a.expand(frames, *x_a.shape[1:]), x_b.expand(frames, *x_b.shape[1:]), t)
    denoiser, cond = _mixed_conditioning(model, t, s.guidance, labels, prompts, s.guidance_interval)
    with precision_context(model, s):
        out = sampling.sample(s.sampler, denoiser, x, sigmas, cond=cond, callback=callback)
    return decode(model, out, s)


@torch.no_grad()
def interpolate(
    model: LoadedModel,
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    settings: SampleSettings | None = None,
    *,
    frames: int = 8,
    labels_a: int | None = None,
    labels_b: int | None = None,
    prompts_a: str | None = None,
    prompts_b: str | None = None,
    callback: sampling.Callback = None,
    **overrides: Any,
) -> torch.Tensor:
    """Frames (frames, C, H, W) in [-1, 1] morphing image_a into image_b: DDIM-invert both
    (each with its own label / prompt), slerp the two noises, DDIM-decode every frame with the
    conditioning blended as described in the module docstring. The end frames reconstruct the
    two images (up to the ODE solver's error). Settings: steps, spacing, guidance (1 unless
    given) and its interval; the sampler is DDIM."""
    _check_frames(frames)
    s = _ode_settings(model, settings, overrides, ODE_SAMPLER).replace(sampler=ODE_SAMPLER)
    x_a = invert(model, image_a, s, labels=[labels_a], prompts=[prompts_a or ""],
                 callback=callback)  # fmt: skip
    x_b = invert(model, image_b, s, labels=[labels_b], prompts=[prompts_b or ""],
                 callback=callback)  # fmt: skip
    return _walk_frames(
        model, x_a[:1], x_b[:1], frames, make_sigmas(model, s.steps, s.spacing), s,
        [labels_a, labels_b], [prompts_a or "", prompts_b or ""], callback,
    )  # fmt: skip


@torch.no_grad()
def walk(
    model: LoadedModel,
    seed_a: int,
    seed_b: int,
    settings: SampleSettings | None = None,
    *,
    frames: int = 8,
    labels_a: int | None = None,
    labels_b: int | None = None,
    prompts_a: str | None = None,
    prompts_b: str | None = None,
    callback: sampling.Callback = None,
    **overrides: Any,
) -> torch.Tensor:
    """A latent walk (frames, C, H, W): the prior noises of `generate` for seed_a and seed_b,
    slerped, each frame sampled with a deterministic sampler (DDIM unless the settings name
    another), labels / prompts blended a -> b. The end frames are what
    `generate(seed=seed_a | seed_b, sampler=sampler)` draws."""
    _check_frames(frames)
    s = SampleSettings.build(settings, **overrides)
    if s.sampler is None:
        s = s.replace(sampler=ODE_SAMPLER)
    if s.sampler in sampling.STOCHASTIC:
        raise UserError(f"walk needs a deterministic sampler, not {s.sampler!r}")
    s = s.resolve(model)
    sigmas = make_sigmas(model, s.steps, s.spacing)
    shape = (1, *model.image_shape)
    x_a, x_b = (
        on_device(model, sampling.prior_noise(model.denoiser, shape, float(sigmas[0]),
                                              sampling.BatchGenerator([i])))
        for i in (seed_a, seed_b)
    )  # fmt: skip
    return _walk_frames(
        model, x_a, x_b, frames, sigmas, s, [labels_a, labels_b],
        [prompts_a or "", prompts_b or ""], callback,
    )  # fmt: skip
