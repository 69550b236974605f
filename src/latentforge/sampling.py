"""Samplers over the one contract (k-diffusion style):

    sample_<name>(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, **knobs) -> x

`denoiser(x, sigma, **cond)` returns the x0 estimate; `x` starts at noise * sigmas[0] (scaled by
the caller, see `prior_noise`); `sigmas` decreases to 0. `callback(step, sigma, x, denoised)`
sees every step. Shared pieces (noise draws, the ancestral split) are helpers below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from .errors import UserError

Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None


class BatchGenerator:
    """One torch.Generator per image (EDM's StackedRandomGenerator): image i with seed s is the
    same whether drawn alone or inside a batch."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = list(seeds)
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
        """(B, *shape[1:]) with row i drawn from generator i."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch {shape[0]} != {len(self.generators)} seeds")
        return torch.stack(
            [
                torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=device)
                for g in self.generators
            ]
        )


Generator = BatchGenerator | torch.Generator | None


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    if isinstance(generator, BatchGenerator):
        return generator.randn(x.shape, x.dtype, x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def prior_noise(
    denoiser, shape: Sequence[int], sigma_max: float, generator: Generator = None
) -> torch.Tensor:
    """The starting point x_T: unit noise scaled to the prior std at sigma_max."""
    scale = (
        denoiser.prior_scale(float(sigma_max)) if hasattr(denoiser, "prior_scale") else sigma_max
    )
    return randn_like(torch.empty(tuple(shape)), generator) * scale


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x)) / sigma (Karras eq. 3)."""
    return (x - denoised) / sigma


def ancestral_split(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise of std
    sigma_up, so the marginal at sigma_to is right. eta=1 is DDPM's posterior variance, eta=0
    is DDIM (Song et al. 2021, eq. 16, rewritten in sigma)."""
    if not eta or sigma_to == 0:
        return sigma_to, sigma_to * 0
    up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt() * eta
    up = torch.minimum(up, sigma_to)
    down = (sigma_to**2 - up**2).sqrt()
    return down, up


def _denoise(denoiser, x, sigma, cond):
    return denoiser(x, sigma * x.new_ones(x.shape[0]), **(cond or {}))


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], cond)
        if callback:
            callback(i, sigmas[i], x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021): deterministic at eta=0 (= Euler in sigma), DDPM-like at eta=1."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], cond)
        if callback:
            callback(i, sigmas[i], x, denoised)
        down, up = ancestral_split(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if up > 0:
            x = x + randn_like(x, generator) * up
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020): the posterior q(x_{t-1} | x_t, x0_hat)."""
    return sample_ddim(
        denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=1.0
    )


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
}

# Samplers that draw fresh noise at every step (the rest are deterministic ODE solvers).
STOCHASTIC = {"ddpm"}


def sampler_knobs(name: str) -> dict[str, object]:
    """The knobs (keyword-only extras) a sampler accepts, with their defaults."""
    fn = get_sampler(name)
    base = {"cond", "generator", "callback"}
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in base
    }


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    name: str,
    denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: Generator = None,
    callback: Callback = None,
    **knobs,
) -> torch.Tensor:
    """Run sampler `name`; unknown knobs are a UserError naming the ones it accepts."""
    fn = get_sampler(name)
    accepted = sampler_knobs(name)
    unknown = set(knobs) - set(accepted)
    if unknown:
        raise UserError(
            f"sampler {name!r} has no option(s) {sorted(unknown)}; it accepts {sorted(accepted)}"
        )
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    return fn(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, **knobs)
