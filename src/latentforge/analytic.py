"""Exact denoisers for Gaussian and Gaussian-mixture data: the oracle for tests and benchmarks.

Under x = x0 + sigma * eps with x0 ~ sum_k w_k N(mu_k, Sigma_k), the noisy marginal is
sum_k w_k N(mu_k, Sigma_k + sigma^2 I) and the posterior mean (the ideal denoiser D) is

    D(x, sigma) = sum_k r_k(x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)],

with responsibilities r_k(x) proportional to w_k N(x; mu_k, Sigma_k + sigma^2 I). Each
Sigma_k is diagonalised once (Sigma_k = U_k diag(l_k) U_k^T), so every sigma costs two matmuls.

`ode_solution` integrates the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al.
2022, eq. 3) with scipy to rtol 1e-10 in float64, in t = log sigma (dx/dt = x - D), which is
smooth over the whole range. For a single Gaussian the solution is closed form
(`gaussian_ode_solution`): in the eigenbasis of Sigma each coordinate obeys
dy/dsigma = sigma y / (l + sigma^2), so y(sigma) is proportional to sqrt(l + sigma^2).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import UserError


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, Sigma_k) in R^dim, with its exact denoiser `__call__(x, sigma)`.

    Follows the denoiser contract: `prior_scale(sigma) = sigma` (a VE model), `sigma_min` and
    `sigma_max` are the range samplers should use. Inputs of shape (B, *) are flattened to
    (B, dim); the maths runs in float64 and the result has the input's dtype.
    """

    def __init__(
        self,
        means: torch.Tensor,
        covs: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 1:
            means = means[None]
        covs = torch.as_tensor(covs, dtype=torch.float64).reshape(
            -1, means.shape[1], means.shape[1]
        )
        k, dim = means.shape
        if covs.shape[0] != k:
            raise UserError(f"{k} means but {covs.shape[0]} covariances")
        weights = torch.ones(k, dtype=torch.float64) if weights is None else weights
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights <= 0).any():
            raise UserError(f"weights must be {k} positive numbers")
        self.means, self.covs, self.weights = means, covs, weights / weights.sum()
        self.dim, self.k = dim, k
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        evals, self.evecs = torch.linalg.eigh(
            (covs + covs.transpose(1, 2)) / 2
        )  # (K, d), (K, d, d)
        if (evals <= 0).any():
            raise UserError("covariances must be positive definite")
        self.evals = evals
        self.log_weights = self.weights.log()

    def prior_scale(self, sigma: float) -> float:
        return sigma

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> torch.Tensor:
        """The mixture's overall covariance (law of total covariance)."""
        centred = self.means - self.mean
        between = torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return torch.einsum("k,kij->ij", self.weights, self.covs) + between

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """The posterior mean E[x0 | x] at noise level sigma (one scalar for the batch, or one per
        input). The maths runs in float64; the result has the input's dtype.

        Per component, with W = U diag(1/sqrt(l + s^2)) and A = U diag(l / (l + s^2)) U^T:
        log N(x; mu, Sigma + s^2 I) = -|W^T (x - mu)|^2 / 2 - sum log(l + s^2) / 2 + const and
        E[x0 | x, k] = mu + A (x - mu); both come from one GEMM of x against [W | A] of every
        component, less the same product of mu (folded in as a last row, against a column of
        ones appended to x)."""
        shape = x.shape
        dtype = torch.float64
        xf = x.reshape(shape[0], -1).to(dtype)  # (B, d)
        if xf.shape[1] != self.dim:
            raise UserError(f"oracle is {self.dim}-D, got inputs of {xf.shape[1]} values")
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if s2.numel() > 1 and not bool((s2 == s2[0]).all()):
            return torch.cat([self(x[i : i + 1], s2[i]) for i in range(shape[0])]).to(x.dtype)
        s2 = float(s2[0]) ** 2
        var = self.evals + s2  # (K, d): eigenvalues of Sigma_k + s^2 I
        W = self.evecs / var.sqrt()[:, None, :]  # (K, d, d), columns scaled
        A = (self.evecs * (self.evals / var)[:, None, :]) @ self.evecs.transpose(1, 2)  # (K,d,d)
        M = torch.cat([W, A.transpose(1, 2)], dim=2)  # (K, d, 2d): x @ M[k] = [W^T x, A x]
        off = torch.einsum("kd,kde->ke", self.means, M)  # (K, 2d): the same product of mu
        M_aug = torch.cat([M.permute(1, 0, 2).reshape(self.dim, -1), -off.reshape(1, -1)])
        x_aug = torch.cat([xf, torch.ones(len(xf), 1, dtype=dtype)], dim=1)  # (B, d + 1)
        prod = (x_aug @ M_aug).view(-1, self.k, 2 * self.dim)  # (B, K, 2d)
        y, shrunk = prod[..., : self.dim], prod[..., self.dim :]
        sq = torch.linalg.vector_norm(y, dim=-1).square()
        log_like = -0.5 * (sq + var.log().sum(-1))  # (B, K)
        resp = torch.softmax(log_like + self.log_weights, dim=1)  # (B, K)
        out = resp @ self.means + torch.bmm(resp[:, None, :], shrunk).squeeze(1)
        return out.reshape(shape).to(x.dtype)

    def component(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Index of each input's most likely component at noise level sigma, shape (B,)."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        var = self.evals[:, None, :] + sigma**2
        z = (xf[None] - self.means[:, None]) @ self.evecs
        log_like = -0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1))
        return (log_like + self.log_weights[:, None]).argmax(0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, (n, dim) float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        root = self.evecs * self.evals.sqrt()[:, None, :]  # (K, d, d): U diag(sqrt l)
        return self.means[comp] + torch.einsum("nij,nj->ni", root[comp], eps)


def gaussian(mean: torch.Tensor, cov: torch.Tensor, **kwargs) -> GaussianMixture:
    """A single Gaussian N(mean, cov) as a one-component mixture."""
    return GaussianMixture(torch.as_tensor(mean)[None], torch.as_tensor(cov)[None], **kwargs)


def random_mixture(
    dim: int,
    k: int,
    seed: int,
    *,
    spread: float = 1.0,
    std_range: tuple[float, float] = (0.05, 0.5),
    **kwargs,
) -> GaussianMixture:
    """A reproducible random mixture: means ~ N(0, spread^2 I), full covariances with random
    orientations and standard deviations log-uniform in `std_range`, Dirichlet(2) weights."""
    g = torch.Generator().manual_seed(int(seed))
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * spread
    q, r = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]  # uniform (Haar) rotations
    lo, hi = (math.log(s) for s in std_range)
    stds = (torch.rand(k, dim, generator=g, dtype=torch.float64) * (hi - lo) + lo).exp()
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
    weights = -torch.log(torch.rand(k, 2, generator=g, dtype=torch.float64)).sum(1)  # Gamma(2)
    return GaussianMixture(means, covs, weights, **kwargs)


def gaussian_ode_solution(
    mean: torch.Tensor,
    cov: torch.Tensor,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float = 0.0,
) -> torch.Tensor:
    """Closed-form PF-ODE map of N(mean, cov) from sigma_from to sigma_to:
    x(sigma_to) = mu + (Sigma + sigma_to^2 I)^1/2 (Sigma + sigma_from^2 I)^-1/2 (x - mu)."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
    gain = ((evals + sigma_to**2) / (evals + sigma_from**2)).sqrt()
    xf = x.reshape(x.shape[0], -1).to(torch.float64) - mean
    out = mean + ((xf @ evecs) * gain) @ evecs.T
    return out.reshape(x.shape)


def ode_solution(
    denoiser,
    x_T: torch.Tensor,
    sigma_max: float,
    sigma_min: float = 0.0,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "DOP853",
    sigma_floor: float = 1e-7,
) -> torch.Tensor:
    """The exact PF-ODE solution from x_T at sigma_max down to sigma_min (float64).

    Integrates dx/dt = x - D(x, e^t) in t = log sigma with scipy's `solve_ivp` (all draws as
    one system). sigma_min = 0 is reached by integrating to `sigma_floor` and taking the
    denoiser there: D(x(s), s) = x(0) + O(s^2), since x(s) - s x'(s) = x(0) - s^2 x''(0)/2.
    """
    from scipy.integrate import solve_ivp

    shape = x_T.shape
    y0 = x_T.reshape(shape[0], -1).to(torch.float64)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).view(y0.shape)
        return (x - denoiser(x, torch.tensor(math.exp(t), dtype=torch.float64))).numpy().ravel()

    sigma_end = max(float(sigma_min), sigma_floor)
    if sigma_end >= sigma_max:
        raise UserError(f"need sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    sol = solve_ivp(
        rhs,
        (math.log(sigma_max), math.log(sigma_end)),
        y0.numpy().ravel(),
        method=method,
        rtol=rtol,
        atol=atol,
    )
    if not sol.success:
        raise RuntimeError(f"ODE solver failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1].copy()).view(y0.shape)
    if sigma_min == 0:
        x = denoiser(x, torch.tensor(sigma_end, dtype=torch.float64))
    return x.reshape(shape)
