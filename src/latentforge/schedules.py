"""Noise schedules as pure functions: betas, alpha_bar <-> sigma <-> t, and sigma spacings.

Notation (Karras et al. 2022): a VP state x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps is
the same point as the VE state x = x0 + sigma eps scaled by sqrt(alpha_bar), where
sigma = sqrt((1 - alpha_bar) / alpha_bar). Samplers work in sigma; discrete models are adapted
in `denoisers.py`. Every function takes an explicit device and holds no state.
"""

from __future__ import annotations

import math

import torch

from .errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = (
    "karras",
    "exponential",
    "polyexponential",
    "vp",
    "optimized",
    "linspace",
    "leading",
    "trailing",
    "lcm",
)
LCM_ORIGINAL_STEPS = 50  # diffusers' LCMScheduler `original_inference_steps`

# alpha_bar used for the last step of a zero-terminal-SNR schedule, so sigma stays finite
# (the same trick diffusers' Euler scheduler uses: 2**-24).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def get_betas(
    name: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Betas of a discrete VP schedule, float64 (DDPM linear, SD scaled_linear, or cosine)."""
    if num_timesteps < 2:
        raise UserError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if name == "linear":  # Ho et al. 2020
        start, end = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(start, end, num_timesteps, dtype=torch.float64, device=device)
    if name == "scaled_linear":  # Rombach et al. 2022 (Stable Diffusion): linear in sqrt(beta)
        start, end = beta_start or 0.00085, beta_end or 0.012
        s = torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64, device=device)
        return s**2
    if name == "cosine":  # Nichol & Dhariwal 2021, eq. 17, s = 0.008, betas clipped at 0.999
        t = torch.arange(num_timesteps + 1, dtype=torch.float64, device=device) / num_timesteps
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise UserError(f"unknown beta schedule {name!r}; choose one of {list(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has SNR 0 (Lin et al. 2024, Alg. 1)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas, 0)


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar); alpha_bar == 0 is clamped (zero-SNR)."""
    alpha_bar = alpha_bar.clamp(min=ZERO_SNR_ALPHA_BAR)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma**2)


def sigma_to_t(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of `sigma`, interpolating linearly in log sigma (k-diffusion style).

    `train_sigmas` is increasing in t; sigmas outside its range are clamped to its ends.
    """
    log_table = train_sigmas.log().to(torch.float64)
    log_sigma = sigma.to(torch.float64).clamp(min=train_sigmas[0]).log()
    idx = torch.searchsorted(log_table, log_sigma.reshape(-1)).clamp(1, len(log_table) - 1)
    lo, hi = log_table[idx - 1], log_table[idx]
    w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
    return (idx - 1 + w).reshape(sigma.shape).to(sigma.dtype)


def t_to_sigma(t: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of `sigma_to_t`: log-linear interpolation of the sigma table at fractional t."""
    log_table = train_sigmas.log().to(torch.float64)
    t = t.to(torch.float64).clamp(0, len(log_table) - 1)
    lo = t.floor().long().clamp(max=len(log_table) - 2)
    w = t - lo
    return ((1 - w) * log_table[lo] + w * log_table[lo + 1]).exp()


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu"
) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n levels uniform in sigma^(1/rho), then a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return _append_zero(sigmas)


def get_sigmas_exponential(
    n: int, sigma_min: float, sigma_max: float, device="cpu"
) -> torch.Tensor:
    """n levels uniform in log sigma, then a final 0."""
    log = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log.exp().to(device))


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device="cpu"
) -> torch.Tensor:
    """n levels with log sigma following a ramp**rho from log sigma_max to log sigma_min
    (k-diffusion's polyexponential; rho = 1 is `exponential`), then a final 0."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log = ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)
    return _append_zero(log.exp().to(device))


def get_sigmas_vp(
    n: int,
    sigma_min: float,
    sigma_max: float,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    device="cpu",
) -> torch.Tensor:
    """Uniform in t for Song et al.'s continuous VP SDE (2021), alpha_bar(t) =
    exp(-(beta_d t^2 / 2 + beta_min t)), so sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1).

    The t range is where sigma(t) spans [sigma_min, sigma_max] (Song's eps_s and T = 1 for the
    default betas and sigma_max = 152), so every spacing covers the same noise levels."""
    if beta_d <= 0 or beta_min < 0:
        raise UserError(f"vp spacing needs beta_d > 0 and beta_min >= 0, got {beta_d}, {beta_min}")

    def t_of(sigma: float) -> float:  # root of beta_d/2 t^2 + beta_min t = log(1 + sigma^2)
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d

    t = torch.linspace(t_of(sigma_max), t_of(sigma_min), n, dtype=torch.float64)
    sigmas = torch.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt()
    sigmas[0] = sigma_max  # exact endpoint despite the round trip
    return _append_zero(sigmas.to(device))


# The "optimized" spacing: knots of log sigma, as the fraction of the way from log sigma_max to
# log sigma_min, at K + 1 evenly spaced step positions u = k / K. Fitted in the spirit of
# Align-Your-Steps (Sabour et al. 2024) by `latentforge.benchmarks.samplers.fit_optimized`
# (`latentforge bench samplers --fit` refits them): minimise the error of DPM-Solver++(2M) and
# UniPC (bh2, and order 3) against the exact ODE solution on random Gaussian mixtures (2-D and
# 64-D, seeds 1000-1005, never the benchmark's), at 5 and 10 denoiser calls, over SD's sigma
# range. Fit: Powell, 20 evaluations from the karras levels, then 250 more; mean
# log(RMS / karras RMS) = -0.43 on the fitting mixtures (docs/samplers.md: unseen seeds).
OPTIMIZED_KNOTS = (0.0, 0.0646, 0.1608, 0.2562, 0.3401, 0.444, 0.5285, 0.6113, 0.7137, 0.8583, 1.0)


def get_sigmas_optimized(
    n: int,
    sigma_min: float,
    sigma_max: float,
    knots: tuple[float, ...] | None = None,
    device="cpu",
) -> torch.Tensor:
    """n levels from the fitted knots (`OPTIMIZED_KNOTS`, K + 1 of them), then a final 0.

    Level i sits at knot position u = K i / n, so the final 0 takes position K and n = K
    reproduces the first K knots. Between knots log sigma is interpolated linearly; in the last
    interval sigma itself goes linearly from knot K-1 to sigma_min (knot K), so the last nonzero
    level approaches sigma_min as n grows (like 1/n) and never falls below it."""
    k = torch.tensor(OPTIMIZED_KNOTS if knots is None else knots, dtype=torch.float64)
    K = len(k) - 1
    log_lo, log_hi = math.log(sigma_min), math.log(sigma_max)
    sig_knots = (log_hi + k * (log_lo - log_hi)).exp()
    sig_knots[0], sig_knots[-1] = sigma_max, sigma_min
    u = torch.arange(n, dtype=torch.float64) * (K / n)
    lo = u.floor().long().clamp(max=K - 1)
    w = u - lo
    log_sig = (1 - w) * sig_knots[lo].log() + w * sig_knots[lo + 1].log()
    lin_sig = (1 - w) * sig_knots[lo] + w * sig_knots[lo + 1]
    sigmas = torch.where(lo == K - 1, lin_sig, log_sig.exp())
    sigmas[0] = sigma_max  # exactly, not exp(log(sigma_max))
    return _append_zero(sigmas.to(device))


def discrete_timesteps(spacing: str, n: int, num_train_timesteps: int) -> torch.Tensor:
    """Timesteps of diffusers' spacings (Lin et al. 2024, Table 2), decreasing, as float64.

    leading: DDIM's original t = k * (T // n) (+ offset 1 as SD uses via steps_offset);
    trailing: round(T - k * T / n) - 1 (reaches t = T-1, needed for zero-terminal SNR);
    linspace: n points evenly from T-1 to 0;
    lcm: diffusers' LCMScheduler: n of the 50 skipping-step timesteps k * T/50 - 1 (LCM's
    distillation grid), evenly by index from the top (999, 759, 499, 259 for n = 4).
    """
    T = num_train_timesteps
    if spacing == "lcm":
        origin = min(LCM_ORIGINAL_STEPS, T)
        if n > origin:
            raise UserError(f"spacing 'lcm' takes at most {origin} steps, got {n}")
        grid = (torch.arange(origin, 0, -1, dtype=torch.float64)) * (T // origin) - 1
        return grid[(torch.arange(n, dtype=torch.float64) * origin / n).floor().long()]
    if spacing == "linspace":
        return torch.linspace(T - 1, 0, n, dtype=torch.float64)
    if spacing == "leading":
        ratio = T // n
        return (torch.arange(n, dtype=torch.float64) * ratio).flip(0) + 1
    if spacing == "trailing":
        ratio = T / n
        return (torch.arange(T, 0, -ratio, dtype=torch.float64).round() - 1)[:n]
    raise UserError(f"unknown discrete spacing {spacing!r}")


def get_sigmas(
    spacing: str,
    steps: int,
    *,
    sigma_min: float,
    sigma_max: float,
    train_sigmas: torch.Tensor | None = None,
    rho: float | None = None,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels for `steps` denoising steps: decreasing, length steps + 1, ending in 0.

    karras (rho, default 7), exponential, polyexponential (rho, default 1), vp (beta_d,
    beta_min) and optimized work for any model and start at sigma_max; leading / trailing /
    linspace pick timesteps of the discrete training schedule `train_sigmas` (increasing in t)
    as diffusers does.
    """
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    if spacing in ("karras", "exponential", "polyexponential", "vp", "optimized") and not (
        0 < sigma_min < sigma_max
    ):
        raise UserError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if spacing == "karras":
        return get_sigmas_karras(steps, sigma_min, sigma_max, 7.0 if rho is None else rho, device)
    if spacing == "exponential":
        return get_sigmas_exponential(steps, sigma_min, sigma_max, device)
    if spacing == "polyexponential":
        rho = 1.0 if rho is None else rho
        return get_sigmas_polyexponential(steps, sigma_min, sigma_max, rho, device)
    if spacing == "vp":
        return get_sigmas_vp(steps, sigma_min, sigma_max, beta_d, beta_min, device)
    if spacing == "optimized":
        return get_sigmas_optimized(steps, sigma_min, sigma_max, device=device)
    if spacing in ("linspace", "leading", "trailing", "lcm"):
        if train_sigmas is None:
            raise UserError(f"spacing {spacing!r} needs a discrete-time model")
        t = discrete_timesteps(spacing, steps, len(train_sigmas)).clamp(0, len(train_sigmas) - 1)
        return _append_zero(t_to_sigma(t, train_sigmas.to(torch.float64)).to(device))
    raise UserError(f"unknown sigma spacing {spacing!r}; choose one of {list(SPACINGS)}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])
