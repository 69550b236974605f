"""Parameterizations: wrap a network into the one contract D(x, sigma, **cond) -> x0 estimate.

Samplers work in VE form x = x0 + sigma * eps (Karras et al. 2022). A discrete VP model
(DDPM, SD) sees x_t = x / sqrt(1 + sigma^2) and the fractional timestep of sigma; its output
(eps, v or x0) is turned into x0 by c_skip / c_out. EDM preconditioning owns c_in, c_noise,
c_skip, c_out around a network that never sees sigma directly. The training losses live next
to the parameterization they belong to.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import schedules
from .errors import UserError

PREDICTIONS = ("eps", "v", "x0")


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () -> broadcastable against x (B, C, H, W)."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def q_sample(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0) = N(sqrt(alpha_bar) x0, (1 - alpha_bar) I) (DDPM eq. 4)."""
    ab = _expand(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7), for any pair of steps."""
    ab_t, ab_p = _expand(alpha_bar_t, x0), _expand(alpha_bar_prev, x0)
    alpha_t = ab_t / ab_p  # the product of (1 - beta) between the two steps
    beta_t = 1 - alpha_t
    mean = (ab_p.sqrt() * beta_t / (1 - ab_t)) * x0 + (
        alpha_t.sqrt() * (1 - ab_p) / (1 - ab_t)
    ) * x_t
    var = (1 - ab_p) / (1 - ab_t) * beta_t
    return mean, var


class VPDenoiser(nn.Module):
    """A discrete-time VP network (eps-, v- or x0-prediction) as a sigma-space denoiser."""

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction: str = "eps",
        *,
        min_snr_gamma: float | None = None,
        clip_denoised: float | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise UserError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.model = model
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.clip_denoised = clip_denoised  # clamp x0 to [-c, c] (pixel models in [-1, 1])
        sigmas = schedules.alpha_bar_to_sigma(alphas_cumprod.to(torch.float64))
        self.register_buffer("train_sigmas", sigmas.float(), persistent=False)
        self.register_buffer("train_sigmas64", sigmas, persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas64[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas64[-1])

    @property
    def num_timesteps(self) -> int:
        return len(self.train_sigmas)

    def prior_scale(self, sigma: float) -> float:
        """Std of x at sigma_max for unit-variance data: x_T / sqrt(alpha_bar_T)."""
        return math.sqrt(1 + sigma**2)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for x0 = c_skip x + c_out F(c_in x, t)."""
        c_in = 1 / (sigma**2 + 1).sqrt()
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction == "v":  # v = a eps - s x0 with a = c_in, s = sigma c_in
            return 1 / (sigma**2 + 1), -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return schedules.sigma_to_t(sigma, self.train_sigmas64)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        c_skip, c_out, c_in = (_expand(c, x) for c in self.scalings(sigma))
        out = self.model(x * c_in, self.sigma_to_t(sigma), **cond)
        denoised = c_skip * x + c_out * out.to(x.dtype)
        if self.clip_denoised:
            denoised = denoised.clamp(-self.clip_denoised, self.clip_denoised)
        return denoised

    def loss(
        self,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        pixel_weight: torch.Tensor | None = None,
        **cond,
    ) -> torch.Tensor:
        """Simple MSE on the network's target (Ho et al. 2020), optionally Min-SNR-gamma weighted
        (Hang et al. 2023). Per-sample losses, shape (B,). `pixel_weight` (broadcastable to x0,
        e.g. (B, 1, H, W)) weighs each element's squared error before the mean."""
        B = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigma = self.train_sigmas[t]
        alpha_bar = 1 / (sigma**2 + 1)
        x_t = q_sample(x0, alpha_bar, noise)
        a, s = _expand(alpha_bar.sqrt(), x0), _expand((1 - alpha_bar).sqrt(), x0)
        target = {"eps": noise, "v": a * noise - s * x0, "x0": x0}[self.prediction]
        out = self.model(x_t, t.to(x0.dtype), **cond)
        per_sample = _weighted_mean(out.float() - target.float(), pixel_weight)
        if self.min_snr_gamma:
            snr = 1 / sigma.double() ** 2
            clipped = snr.clamp(max=self.min_snr_gamma)
            weight = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}
            per_sample = per_sample * weight[self.prediction].float()
        return per_sample


class EDMDenoiser(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a network F(c_in x, c_noise)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        clip_denoised: float | None = None,
    ):
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.p_mean, self.p_std = p_mean, p_std
        self.clip_denoised = clip_denoised
        self.train_sigmas64 = None  # continuous-time: no discrete table

    def prior_scale(self, sigma: float) -> float:
        return sigma

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        out = self.model(x * _expand(c_in, x), c_noise, **cond)
        denoised = _expand(c_skip, x) * x + _expand(c_out, x) * out.to(x.dtype)
        if self.clip_denoised:
            denoised = denoised.clamp(-self.clip_denoised, self.clip_denoised)
        return denoised

    def loss(
        self,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        pixel_weight: torch.Tensor | None = None,
        **cond,
    ) -> torch.Tensor:
        """EDM loss: log-normal sigma, weight (sigma^2 + sd^2) / (sigma sd)^2 (Karras eq. 8);
        `pixel_weight` as in VPDenoiser.loss."""
        B = x0.shape[0]
        n = torch.randn((B,), generator=generator, device=x0.device)
        sigma = (n * self.p_std + self.p_mean).exp()
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        # Train on the raw output (no clamp) so gradients flow everywhere.
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        x = x0 + _expand(sigma, x0) * noise
        out = self.model(x * _expand(c_in, x), c_noise, **cond)
        denoised = _expand(c_skip, x) * x + _expand(c_out, x) * out
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return weight * _weighted_mean(denoised.float() - x0.float(), pixel_weight)


def _weighted_mean(error: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of the squared error, each element weighed by `weight` when given."""
    squared = error.pow(2)
    if weight is not None:
        squared = squared * weight.to(squared)
    return squared.flatten(1).mean(1)


def make_denoiser(model: nn.Module, spec: dict) -> VPDenoiser | EDMDenoiser:
    """Build the denoiser a model folder's `parameterization` block describes.

    {"type": "vp", "prediction": "eps", "beta_schedule": "cosine", "num_timesteps": 1000,
     "zero_terminal_snr": false} or {"type": "edm", "sigma_data": 0.5, ...}.
    """
    kind = spec.get("type", "vp")
    clip = spec.get("clip_denoised")
    if kind == "edm":
        keys = ("sigma_data", "sigma_min", "sigma_max", "p_mean", "p_std")
        return EDMDenoiser(model, clip_denoised=clip, **{k: spec[k] for k in keys if k in spec})
    if kind != "vp":
        raise UserError(f"unknown parameterization type {kind!r}; use 'vp' or 'edm'")
    betas = schedules.get_betas(
        spec.get("beta_schedule", "linear"),
        spec.get("num_timesteps", 1000),
        beta_start=spec.get("beta_start"),
        beta_end=spec.get("beta_end"),
    )
    if spec.get("zero_terminal_snr"):
        betas = schedules.rescale_zero_terminal_snr(betas)
    return VPDenoiser(
        model,
        schedules.alphas_cumprod(betas),
        spec.get("prediction", "eps"),
        min_snr_gamma=spec.get("min_snr_gamma"),
        clip_denoised=clip,
    )
