"""Samplers over the one contract (k-diffusion style):

    sample_<name>(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, **knobs) -> x

`denoiser(x, sigma, **cond)` returns the x0 estimate; `x` starts at noise * sigmas[0] (scaled by
the caller, see `prior_noise`); `sigmas` decreases to 0. `callback(step, sigma, x, denoised)`
sees every step (once per step, after the step's first denoiser call). Shared pieces (noise
draws, the ancestral split, EDM churn, the final step to sigma = 0) are helpers below; every
noise draw goes through `randn_like(x, generator)`, so per-image seeds (`BatchGenerator`) hold.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.polynomial import Polynomial

from .errors import UserError

Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None


class BatchGenerator:
    """One torch.Generator per image (EDM's StackedRandomGenerator): image i with seed s is the
    same whether drawn alone or inside a batch."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = list(seeds)
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
        """(B, *shape[1:]) with row i drawn from generator i, on the generators' device and
        moved to `device`: a seed draws the same numbers whatever device samples them."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch {shape[0]} != {len(self.generators)} seeds")
        draws = torch.stack(
            [
                torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=g.device)
                for g in self.generators
            ]
        )
        return draws.to(device)

    def subset(self, start: int, stop: int) -> BatchGenerator:
        """Images start:stop, sharing their generators (their draws go on where they were)."""
        part = BatchGenerator([])
        part.seeds, part.generators = self.seeds[start:stop], self.generators[start:stop]
        return part


Generator = BatchGenerator | torch.Generator | None


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    if isinstance(generator, BatchGenerator):
        return generator.randn(x.shape, x.dtype, x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def prior_noise(
    denoiser,
    shape: Sequence[int],
    sigma_max: float,
    generator: Generator = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The starting point x_T: unit noise scaled to the prior std at sigma_max. The noise is
    drawn from `generator`, or is `noise` when given (unit Gaussian, of shape `shape`)."""
    scale = (
        denoiser.prior_scale(float(sigma_max)) if hasattr(denoiser, "prior_scale") else sigma_max
    )
    if noise is None:
        return randn_like(torch.empty(tuple(shape)), generator) * scale
    if tuple(noise.shape) != tuple(shape):
        raise UserError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    return noise.to(torch.float32) * scale


def ancestral_split(sigma_from, sigma_to, eta: float = 1.0):
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise of std
    sigma_up, so the marginal at sigma_to is right. eta=1 is DDPM's posterior variance, eta=0
    is DDIM (Song et al. 2021, eq. 16, rewritten in sigma). Floats or 0-d tensors."""
    if not eta or sigma_to == 0 or sigma_to >= sigma_from:
        return sigma_to, sigma_to * 0
    up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5 * eta)
    return (sigma_to**2 - up**2) ** 0.5, up


def _denoise(denoiser, x: torch.Tensor, sigma: float, cond: dict | None) -> torch.Tensor:
    """One denoiser call at noise level `sigma` for every image of the batch."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return denoiser(
        x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device), **(cond or {})
    )


def _levels(sigmas: torch.Tensor) -> list[tuple[int, float, float]]:
    """(step, sigma, sigma_next) as Python floats: the per-step maths runs in float64 scalars."""
    s = sigmas.tolist()
    return [(i, s[i], s[i + 1]) for i in range(len(s) - 1)]


def _report(callback: Callback, i: int, sigma: float, x: torch.Tensor, denoised: torch.Tensor):
    if callback is not None:
        callback(i, torch.tensor(sigma), x, denoised)


def _euler_step(x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor):
    """x moved along dx/dsigma = (x - D) / sigma; the step to sigma = 0 lands on D exactly."""
    if sigma_next == 0:
        return denoised
    return x + (x - denoised) * ((sigma_next - sigma) / sigma)


FINAL_STEPS = ("ab2", "denoised")


def _check_final(final_step: str) -> None:
    if final_step not in FINAL_STEPS:
        raise UserError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")


def _step_to_zero(x: torch.Tensor, sigma: float, denoised: torch.Tensor, prev=None, x_eval=None):
    """The last step, sigma -> 0, for the multistep ODE solvers. lambda = -log sigma is infinite
    there, so instead of an exponential-integrator step this integrates dx/dsigma = d(sigma) in
    sigma with d extrapolated linearly through the previous evaluation prev = (sigma_p, x_p,
    D_p) (x_eval: where `denoised` was computed, if x has since been corrected): 2nd-order
    Adams-Bashforth, x0 = x - sigma d + slope sigma^2 / 2. It costs no extra
    call and removes most of the error floor that `x0 = D(x, sigma_min)` leaves for smooth data
    (d -> 0 as sigma -> 0 there, while the plain step assumes d constant). The multistep
    samplers' knob final_step="denoised" takes the plain step instead, as k-diffusion and
    diffusers (lower_order_final) do."""
    if prev is None:
        return denoised
    sigma_p, x_p, denoised_p = prev
    d = (x if x_eval is None else x_eval) - denoised
    d, d_p = d / sigma, (x_p - denoised_p) / sigma_p
    return x - sigma * d + (d - d_p) * (sigma**2 / (2 * (sigma - sigma_p)))


def _add_noise(x: torch.Tensor, std: float, generator: Generator) -> torch.Tensor:
    return x + randn_like(x, generator) * std if std > 0 else x


def _churn(x, sigma, i_steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """EDM's stochastic churn (Karras et al. 2022, Alg. 2 lines 4-6): raise the noise level to
    sigma_hat = sigma (1 + gamma) by adding fresh noise, gamma = min(s_churn / N, sqrt 2 - 1)."""
    gamma = min(s_churn / i_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return _add_noise(x, s_noise * (sigma_hat**2 - sigma**2) ** 0.5, generator), sigma_hat


def _lam(sigma: float) -> float:
    """lambda = -log sigma (half the log-SNR), the variable of the exponential integrators."""
    return -math.log(sigma)


def _edm_steps(denoiser, x, sigmas, cond, generator, callback, churn, *, second_order):
    """EDM Algorithm 2 (Karras et al. 2022): optional churn, an Euler step, and for Heun the
    trapezoidal correction (one more call) on every step but the last, to sigma = 0."""
    for i, sigma, sigma_next in _levels(sigmas):
        x, sigma = _churn(x, sigma, len(sigmas) - 1, *churn, generator)
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        x_euler = _euler_step(x, sigma, sigma_next, denoised)
        if not second_order or sigma_next == 0:  # Alg. 2 line 9: the last step stays first order
            x = x_euler
            continue
        d = (x - denoised) / sigma
        d_next = (x_euler - _denoise(denoiser, x_euler, sigma_next, cond)) / sigma_next
        x = x + (d + d_next) * ((sigma_next - sigma) / 2)
    return x


@torch.no_grad()
def sample_euler(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
):  # fmt: skip
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with Euler steps)."""
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _edm_steps(denoiser, x, sigmas, cond, generator, callback, churn, second_order=False)


@torch.no_grad()
def sample_heun(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
):  # fmt: skip
    """Heun's 2nd-order method with optional churn (Karras et al. 2022, EDM Algorithm 2)."""
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _edm_steps(denoiser, x, sigmas, cond, generator, callback, churn, second_order=True)


@torch.no_grad()
def sample_dpm2(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """DPM-Solver-2 in sigma, midpoint at the geometric mean (Lu et al. 2022; k-diffusion)."""
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_mid = (sigma * sigma_next) ** 0.5
        x_mid = _euler_step(x, sigma, sigma_mid, denoised)
        denoised_mid = _denoise(denoiser, x_mid, sigma_mid, cond)
        x = x + (x_mid - denoised_mid) * ((sigma_next - sigma) / sigma_mid)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, s_noise=1.0
):
    """Ancestral Euler: an ODE step to sigma_down, then fresh noise (Song et al. 2021; k-diff.)."""
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        down, up = ancestral_split(sigma, sigma_next, eta)
        x = _add_noise(_euler_step(x, sigma, down, denoised), up * s_noise, generator)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021): deterministic at eta=0 (= Euler in sigma), DDPM-like at eta=1."""
    return sample_euler_ancestral(
        denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=eta
    )


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020): the posterior q(x_{t-1} | x_t, x0_hat)."""
    return sample_ddim(
        denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=1.0
    )


def _lms_coefficients(nodes: list[float], lo: float, hi: float) -> list[float]:
    """Integrals over [lo, hi] of the Lagrange basis polynomials through `nodes` (exact), in the
    shifted variable u = sigma - lo so the monomial coefficients stay well conditioned."""
    coeffs = []
    for j, node in enumerate(nodes):
        others = [o - lo for o in nodes[:j] + nodes[j + 1 :]]
        basis = Polynomial.fromroots(others) if others else Polynomial([1.0])
        antideriv = (basis / math.prod(node - lo - o for o in others)).integ()
        coeffs.append(float(antideriv(hi - lo)))
    return coeffs


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, order=4):
    """Linear multistep (variable-step Adams-Bashforth) in sigma (Karras et al. 2022; k-diff.)."""
    _check_order("lms", order, 1, 6)
    ds: list[torch.Tensor] = []  # dx/dsigma at the previous levels, newest first
    levels = sigmas.tolist()
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        ds = [(x - denoised) / sigma, *ds][:order]
        nodes = [levels[i - j] for j in range(len(ds))]
        coeffs = _lms_coefficients(nodes, sigma, sigma_next)
        x = x + sum(c * d for c, d in zip(coeffs, ds, strict=True))
    return x


# iPNDM's fixed Adams-Bashforth weights for equal steps, newest derivative first.
_IPNDM_WEIGHTS = (
    [1.0],
    [3 / 2, -1 / 2],
    [23 / 12, -16 / 12, 5 / 12],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
)


@torch.no_grad()
def sample_ipndm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, order=4):
    """Improved PNDM: fixed-weight Adams-Bashforth warm-started at low order (Zhang & Chen 2023)."""
    _check_order("ipndm", order, 1, 4)
    ds: list[torch.Tensor] = []
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        ds = [(x - denoised) / sigma, *ds][:order]
        slope = sum(w * d for w, d in zip(_IPNDM_WEIGHTS[len(ds) - 1], ds, strict=True))
        x = x + slope * (sigma_next - sigma)
    return x


def _dpmpp_multistep(
    denoiser, x, sigmas, cond, generator, callback, *, order, eta, s_noise, solver_type,
    final_step="ab2",
):  # fmt: skip
    """DPM-Solver++ multistep in lambda = -log sigma, as an SDE for eta > 0 (shared by 2M, 2M SDE
    and 3M SDE). The linear part is integrated exactly; D is extrapolated by the last 1-2 steps."""
    if solver_type not in ("midpoint", "heun"):
        raise UserError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if eta < 0:
        raise UserError(f"eta must be >= 0, got {eta}")
    _check_final(final_step)
    history: list[tuple[float, torch.Tensor]] = []  # (h, denoised) of previous steps, newest first
    prev = None  # (sigma, x, denoised) of the previous evaluation, for the step to 0
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = _step_to_zero(x, sigma, denoised, None if eta or final_step != "ab2" else prev)
            continue
        prev = (sigma, x, denoised)
        h = _lam(sigma_next) - _lam(sigma)
        h_eta = h * (1 + eta)  # eta > 0 adds the SDE's extra decay, replaced by fresh noise
        phi_1 = -math.expm1(-h_eta)
        x = math.exp(-h_eta) * x + phi_1 * denoised  # exp(-h_eta) = sigma_next/sigma e^(-eta h)
        phi_2 = 1 - phi_1 / h_eta
        k = min(order, len(history) + 1)
        if k >= 2:
            r0 = history[0][0] / h
            d1_0 = (denoised - history[0][1]) / r0
            if k == 2:
                x = x + (0.5 * phi_1 if solver_type == "midpoint" else phi_2) * d1_0
            else:  # 3M: D quadratic in lambda through the last three values
                r1 = history[1][0] / h
                d1_1 = (history[0][1] - history[1][1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))  # ~ h D'
                d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 D'' / 2
                phi_3 = phi_2 / h_eta - 0.5
                # int_0^h e^-(h-u) u^2/2 du = -h^2 phi_3, so the D'' term is -2 phi_3 d2. (The
                # k-diffusion / diffusers 3M updates use -phi_3 d2, which is only 2nd order.)
                x = x + phi_2 * d1 - 2 * phi_3 * d2
        if eta:
            x = _add_noise(x, sigma_next * (-math.expm1(-2 * eta * h)) ** 0.5 * s_noise, generator)
        history = [(h, denoised), *history][:2]
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, final_step="ab2"
):
    """DPM-Solver++(2M), multistep 2nd order in log sigma (Lu et al. 2022, Alg. 2)."""
    return _dpmpp_multistep(
        denoiser, x, sigmas, cond, generator, callback,
        order=2, eta=0.0, s_noise=1.0, solver_type="midpoint", final_step=final_step,
    )  # fmt: skip


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None,
    eta=1.0, s_noise=1.0, solver_type="midpoint",
):  # fmt: skip
    """DPM-Solver++(2M) SDE: the 2M step on the reverse SDE for eta > 0 (Lu et al. 2022)."""
    return _dpmpp_multistep(
        denoiser, x, sigmas, cond, generator, callback,
        order=2, eta=eta, s_noise=s_noise, solver_type=solver_type,
    )  # fmt: skip


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, s_noise=1.0
):
    """DPM-Solver++(3M) SDE, 3rd-order multistep; eta=0 is the 3M ODE solver (Lu et al. 2022)."""
    return _dpmpp_multistep(
        denoiser, x, sigmas, cond, generator, callback,
        order=3, eta=eta, s_noise=s_noise, solver_type="heun",
    )  # fmt: skip


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, s_noise=1.0
):
    """DPM-Solver++(2S) single-step to sigma_down, then ancestral noise (Lu et al. 2022)."""
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        down, up = ancestral_split(sigma, sigma_next, eta)
        if down == 0:
            x = denoised
        else:  # midpoint in lambda (r = 1/2), data-prediction form
            sigma_mid = (sigma * down) ** 0.5
            x_mid = (sigma_mid / sigma) * x - math.expm1(_lam(sigma) - _lam(sigma_mid)) * denoised
            denoised_mid = _denoise(denoiser, x_mid, sigma_mid, cond)
            x = (down / sigma) * x - math.expm1(_lam(sigma) - _lam(down)) * denoised_mid
        x = _add_noise(x, up * s_noise, generator)
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM, Luo et al. 2023): jump to
    the consistency model's x0, then re-noise it to the next level with fresh noise."""
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        x = _add_noise(denoised, sigma_next, generator)  # the last step (to 0) draws nothing
    return x


def _unipc_rhos(rks: list[float], hh: float, b_h: float, solve_all: bool) -> list[float]:
    """UniPC's weights rho (Zhao et al. 2023, Alg. 2/3): solve R rho = b, R_ij = r_j^(i-1), with
    b_i = i! g_i / B(h), g_1 = (e^hh - 1)/hh - 1, g_(i+1) = g_i/hh - 1/(i+1)! (scaled phi
    functions). The predictor solves without the new point (the trailing r = 1)."""
    n = len(rks)
    b, h_phi, fact = [], math.expm1(hh) / hh - 1, 1.0
    for i in range(1, n + 1):
        b.append(h_phi * fact / b_h)
        fact *= i + 1
        h_phi = h_phi / hh - 1 / fact
    m = n if solve_all else n - 1
    if m == 0:
        return []
    if m == 1:  # UniPC-2 predictor and first-order corrector use the fixed weight 1/2
        return [0.5]
    R = np.array([[r ** (i - 1) for r in rks[:m]] for i in range(1, m + 1)])
    return np.linalg.solve(R, np.array(b[:m])).tolist()


def _unipc_update(x, sigma, sigma_next, history, new, variant):
    """One UniP (new is None) or UniC (new = D at the predicted point) step from (x, sigma) to
    sigma_next in data-prediction form; history = [(sigma_k, D_k)], newest (at sigma) first."""
    lam, lam_next = _lam(sigma), _lam(sigma_next)
    h = lam_next - lam
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    m0 = history[0][1]
    rks = [(_lam(s) - lam) / h for s, _ in history[1:]]
    diffs = [(m - m0) / r for (_, m), r in zip(history[1:], rks, strict=True)]
    if new is not None:
        rks, diffs = [*rks, 1.0], [*diffs, new - m0]
    rhos = _unipc_rhos([*rks, 1.0] if new is None else rks, hh, b_h, new is not None)
    x = (sigma_next / sigma) * x - math.expm1(hh) * m0
    for rho, diff in zip(rhos, diffs, strict=True):
        x = x - (b_h * rho) * diff
    return x


@torch.no_grad()
def sample_unipc(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None,
    order=2, variant="bh2", corrector=True, final_step="ab2",
):  # fmt: skip
    """UniPC: UniP-p multistep predictor + UniC corrector, B(h) = bh1 / bh2 (Zhao et al. 2023)."""
    _check_order("unipc", order, 1, 4)
    if variant not in ("bh1", "bh2"):
        raise UserError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    _check_final(final_step)
    history: list[tuple[float, torch.Tensor]] = []  # (sigma, D) at previous levels, newest first
    x_prev = prev = None  # the point the last predictor started from; its (sigma, x, D)
    for i, sigma, sigma_next in _levels(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, denoised)
        x_eval = x
        if corrector and x_prev is not None:  # UniC reuses D at the new point: no extra call
            x = _unipc_update(x_prev, history[0][0], sigma, history, denoised, variant)
        history = [(sigma, denoised), *history][:order]
        if sigma_next == 0:
            x = _step_to_zero(x, sigma, denoised, prev if final_step == "ab2" else None, x_eval)
            continue
        x_prev, prev = x, (sigma, x_eval, denoised)
        x = _unipc_update(x, sigma, sigma_next, history, None, variant)
    return x


def _check_order(name: str, order: int, lo: int, hi: int):
    if not isinstance(order, int) or not lo <= order <= hi:
        raise UserError(f"{name} order must be an integer in {lo}..{hi}, got {order!r}")


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
    "lcm": sample_lcm,
}

# Samplers that draw fresh noise at every step by default (the rest are deterministic ODE
# solvers unless a knob such as ddim's eta or heun's s_churn asks for noise).
STOCHASTIC = {
    "ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral", "lcm",
}  # fmt: skip

# Samplers that call the denoiser twice a step (once on their last step, to sigma = 0).
TWO_CALL = {"heun", "dpm2", "dpmpp_2s_ancestral"}


def calls_per_step(name: str) -> int:
    return 2 if name in TWO_CALL else 1


def steps_for_nfe(nfe: int, calls_per_step: int) -> int:
    """The steps that spend at most `nfe` denoiser calls at `calls_per_step` calls a step: a
    two-call sampler's (nfe + 1) // 2 steps make 2 * steps - 1 calls."""
    return nfe if calls_per_step == 1 else (nfe + 1) // 2


# The numeric knobs' ranges (lo, hi, inclusive): finite everywhere except s_tmax, whose default
# is +inf (no upper level for churn). Wider than the values that make sense (A1111's eta slider
# is 0..1, EDM's s_noise 1.0..1.01, s_churn up to 80; gamma is capped at sqrt 2 - 1 anyway), but
# narrow enough that no value overflows a step: s_noise=1e308 gave an all-black image before.
KNOB_RANGES: dict[str, tuple[float, float]] = {
    "eta": (0.0, 2.0),
    "s_noise": (0.0, 2.0),
    "s_churn": (0.0, 1000.0),
    "s_tmin": (0.0, 1e6),
    "s_tmax": (0.0, math.inf),
}


def check_knobs(name: str, knobs: dict[str, object]) -> None:
    """UserError for an unknown knob of sampler `name`, or a numeric one that is not a finite
    number in its `KNOB_RANGES` range (s_tmax may be +inf). Samplers check the rest (order,
    variant, final_step) themselves."""
    accepted = sampler_knobs(name)
    unknown = set(knobs) - set(accepted)
    if unknown:
        raise UserError(
            f"sampler {name!r} has no option(s) {sorted(unknown)}; it accepts {sorted(accepted)}"
        )
    for key, value in knobs.items():
        if key not in KNOB_RANGES:
            continue
        lo, hi = KNOB_RANGES[key]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not lo <= value <= hi:  # NaN fails the comparison too
            raise UserError(f"{key} must be a number in [{lo:g}, {hi:g}], got {value!r}")


class NonFiniteError(UserError):
    """Sampling produced NaN or Inf: the job fails with this instead of writing a black image."""


def _finite_denoiser(denoiser, steps: list[float]):
    """`denoiser` with a NaN/Inf check on every output (one reduction per call)."""

    def checked(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        out = denoiser(x, sigma, **cond)
        if not bool(torch.isfinite(out).all()):
            level = float(sigma.flatten()[0])
            step = min(range(len(steps)), key=lambda i: abs(steps[i] - level))
            bad = "the input" if not bool(torch.isfinite(x).all()) else "the denoiser's output"
            raise NonFiniteError(
                f"sampling produced NaN/Inf at step {step + 1} of {len(steps) - 1} (sigma "
                f"{level:.4g}) in {bad}: lower the guidance or the sampler's noise knobs, or "
                "use fp32/bf16 instead of fp16"
            )
        return out

    return checked


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
    check_knobs(name, knobs)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise UserError(f"sigmas must be a 1-D sequence of at least 2 levels, got {sigmas.shape}")
    # float64 levels for float64 samples (convergence tests); float32 otherwise
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigmas = sigmas.to(device=x.device, dtype=dtype)
    if not bool(torch.isfinite(sigmas[1:]).all()):
        raise UserError("sigmas must be finite after the first level")
    checked = _finite_denoiser(denoiser, sigmas.tolist())
    out = fn(checked, x, sigmas, cond=cond, generator=generator, callback=callback, **knobs)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            f"sampler {name!r} ended with NaN/Inf in the sample: lower its noise knobs or the "
            "guidance, or use fp32/bf16 instead of fp16"
        )
    return out
