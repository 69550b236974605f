"""The analytic oracle: exact denoisers and exact PF-ODE solutions for Gaussian (mixture) data."""

import math

import pytest
import torch

from latentforge import analytic
from latentforge.errors import UserError

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def _mixture():
    means = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-1.5, 2.0]], dtype=torch.float64)
    covs = torch.stack(
        [
            torch.tensor([[0.3, 0.1], [0.1, 0.2]]),
            torch.tensor([[0.1, 0.0], [0.0, 0.4]]),
            torch.tensor([[0.5, -0.2], [-0.2, 0.3]]),
        ]
    ).double()
    return analytic.GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2]))


def test_single_gaussian_denoiser_is_the_linear_posterior_mean():
    g = analytic.gaussian(MU, COV)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)  # one per row
    expected = torch.stack(
        [
            MU + COV @ torch.linalg.solve(COV + s**2 * torch.eye(2), xi - MU)
            for xi, s in zip(x, sigma, strict=True)
        ]
    )
    assert torch.allclose(g(x, sigma), expected, atol=1e-12)
    assert g(x.float(), sigma).dtype == torch.float32


def test_mixture_denoiser_matches_monte_carlo_posterior_mean():
    """E[x0 | x] by self-normalised importance sampling over 400k prior draws, weights
    N(x; x0, sigma^2 I); its standard error here is ~3e-3, the tolerance 1.5e-2."""
    mix = _mixture()
    x0 = mix.sample(400_000, torch.Generator().manual_seed(1))
    x = torch.tensor([[0.7, 0.9], [1.5, 2.5]], dtype=torch.float64)
    sigma = 0.8
    for xi in x:
        logw = -((x0 - xi) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        exact = mix(xi[None], torch.tensor(sigma, dtype=torch.float64))[0]
        assert torch.allclose(exact, mc, atol=1.5e-2), (exact, mc)


def test_mixture_limits_and_sampling_moments():
    mix = _mixture()
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    # sigma -> 0: D(x) -> x; sigma -> inf: D(x) -> the data mean
    assert torch.allclose(mix(x, torch.tensor(1e-6, dtype=torch.float64)), x, atol=1e-9)
    assert torch.allclose(mix(x, torch.tensor(1e6, dtype=torch.float64))[0], mix.mean, atol=1e-6)
    draws = mix.sample(200_000, torch.Generator().manual_seed(2))
    assert torch.allclose(draws.mean(0), mix.mean, atol=0.01)
    assert torch.allclose(torch.cov(draws.T), mix.cov, atol=0.02)


def test_random_mixture_is_reproducible_and_validated():
    a, b = analytic.random_mixture(8, 4, seed=3), analytic.random_mixture(8, 4, seed=3)
    assert torch.equal(a.means, b.means) and torch.equal(a.covs, b.covs)
    assert not torch.equal(a.means, analytic.random_mixture(8, 4, seed=4).means)
    assert a.prior_scale(2.0) == 2.0 and a.dim == 8 and a.k == 4
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)  # (B, C, H, W) flattens to 8 values
    assert a(x, torch.tensor(1.0)).shape == x.shape
    with pytest.raises(UserError, match="8-D"):
        a(torch.randn(3, 5), torch.tensor(1.0))
    with pytest.raises(UserError, match="positive definite"):
        analytic.gaussian(MU, -COV)


def test_gaussian_closed_form_solves_the_pf_ode():
    """x(s) = mu + (Sigma + s^2)^1/2 (Sigma + s_max^2)^-1/2 (x_T - mu) satisfies
    dx/ds = (x - D(x, s)) / s: central differences match to 1e-7."""
    g = analytic.gaussian(MU, COV)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 20
    for s in (0.05, 0.7, 5.0):
        eps = 1e-5 * s
        xs = [analytic.gaussian_ode_solution(MU, COV, x_T, 20.0, v) for v in (s - eps, s, s + eps)]
        deriv = (xs[2] - xs[0]) / (2 * eps)
        assert torch.allclose(deriv, (xs[1] - g(xs[1], torch.tensor(s))) / s, atol=1e-7)


@pytest.mark.parametrize("sigma_min", [0.0, 0.3])
def test_ode_solution_matches_closed_form_for_a_gaussian(sigma_min):
    g = analytic.gaussian(MU, COV)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 80
    exact = analytic.gaussian_ode_solution(MU, COV, x_T, 80.0, sigma_min)
    solved = analytic.ode_solution(g, x_T, 80.0, sigma_min)
    assert torch.allclose(solved, exact, atol=1e-8)


def test_ode_solution_composes_for_a_mixture():
    """sigma_max -> 1 -> 0 equals sigma_max -> 0 (the flow map is a semigroup)."""
    mix = _mixture()
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 10
    direct = analytic.ode_solution(mix, x_T, 10.0)
    two_legs = analytic.ode_solution(mix, analytic.ode_solution(mix, x_T, 10.0, 1.0), 1.0)
    assert torch.allclose(direct, two_legs, atol=1e-7)
    assert math.isfinite(float(direct.abs().max()))
