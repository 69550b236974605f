"""DDPM and DDIM over the denoiser contract, checked against an exact Gaussian denoiser."""

import pytest
import torch

from latentforge import sampling, schedules
from latentforge.errors import UserError

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


class GaussianDenoiser:
    """Exact posterior mean E[x0 | x0 + sigma eps = x] for x0 ~ N(MU, COV)."""

    sigma_min, sigma_max = 0.002, 80.0

    def prior_scale(self, sigma):
        return sigma

    def __call__(self, x, sigma, **cond):
        s2 = sigma.reshape(-1, 1, 1).to(x.dtype) ** 2
        eye = torch.eye(2, dtype=x.dtype)
        gain = COV @ torch.linalg.inv(COV + s2 * eye)  # (B, 2, 2)
        return MU + ((x - MU).unsqueeze(1) @ gain.transpose(1, 2)).squeeze(1)


def _sigmas(n):
    return schedules.get_sigmas("karras", n, sigma_min=0.002, sigma_max=80.0).to(torch.float64)


@pytest.mark.parametrize(
    ("name", "steps", "tol"),
    [("ddim", 100, 0.05), ("ddpm", 200, 0.08)],
)
def test_samples_match_data_moments(name, steps, tol):
    """8,000 draws: mean within 0.05 (0.08 for DDPM's extra noise), covariance within the same
    absolute tolerance (standard errors are ~0.015 at this sample size)."""
    den = GaussianDenoiser()
    gen = torch.Generator().manual_seed(0)
    sig = _sigmas(steps)
    x = torch.randn(8000, 2, generator=gen, dtype=torch.float64) * sig[0]
    fn = sampling.get_sampler(name)
    out = fn(den, x, sig, generator=gen)
    assert torch.allclose(out.mean(0), MU, atol=tol)
    assert torch.allclose(torch.cov(out.T), COV, atol=tol)


def test_ddim_converges_to_the_exact_ode_map_at_first_order():
    """DDIM (eta=0) is Euler on the PF-ODE; for Gaussian data the exact map from sigma_max is
    x0 = MU + COV^1/2 (COV + s^2 I)^-1/2 (x - MU). Doubling the steps halves the error."""
    den = GaussianDenoiser()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    evals, evecs = torch.linalg.eigh(COV)
    half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    evals2, evecs2 = torch.linalg.eigh(COV + 80.0**2 * torch.eye(2, dtype=torch.float64))
    inv_half = evecs2 @ torch.diag(evals2.rsqrt()) @ evecs2.T
    exact = MU + (x - MU) @ (half @ inv_half).T
    err = [
        (sampling.sample_ddim(den, x, _sigmas(n)) - exact).abs().max().item() for n in (200, 400)
    ]
    assert err[1] < 0.02
    assert 1.7 < err[0] / err[1] < 2.3  # order 1


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_seeded_per_image_and_batch_independent(name):
    den = GaussianDenoiser()
    sig = _sigmas(10).float()
    gen = sampling.BatchGenerator([5, 6, 7])
    batch = sampling.prior_noise(den, (3, 2), float(sig[0]), gen)
    out = sampling.sample(name, den, batch, sig, generator=gen)
    one_gen = sampling.BatchGenerator([6])
    alone = sampling.sample(
        name, den, sampling.prior_noise(den, (1, 2), float(sig[0]), one_gen), sig, generator=one_gen
    )
    assert torch.allclose(out[1:2], alone, atol=1e-5)
    gen2 = sampling.BatchGenerator([5, 6, 7])
    again = sampling.sample(
        name, den, sampling.prior_noise(den, (3, 2), float(sig[0]), gen2), sig, generator=gen2
    )
    assert torch.equal(out, again)


def test_callback_once_per_step_and_bad_names():
    den = GaussianDenoiser()
    seen = []
    x = torch.randn(4, 2) * 80
    sampling.sample("ddim", den, x, _sigmas(7).float(), callback=lambda i, s, x, d: seen.append(i))
    assert seen == list(range(7))
    with pytest.raises(UserError, match="unknown sampler"):
        sampling.sample("nope", den, x, _sigmas(3))
    with pytest.raises(UserError, match="no option"):
        sampling.sample("ddim", den, x, _sigmas(3), etaa=0.5)


@pytest.mark.parametrize(
    ("sampler", "knobs", "match"),
    [
        ("euler_ancestral", {"s_noise": 1e308}, "s_noise must be a number in"),
        ("ddim", {"eta": float("nan")}, "eta must be a number in"),
        ("ddim", {"eta": -0.5}, "eta must be a number in"),
        ("dpmpp_2m_sde", {"eta": float("inf")}, "eta must be a number in"),
        ("euler", {"s_churn": True}, "s_churn must be a number in"),
        ("euler", {"s_tmin": "0.1"}, "s_tmin must be a number in"),
        ("euler", {"s_tmax": float("-inf")}, "s_tmax must be a number in"),
        ("euler", {"eta": 0.5}, "has no option"),
    ],
)
def test_knobs_finite_and_ranged(sampler, knobs, match):
    with pytest.raises(UserError, match=match):
        sampling.check_knobs(sampler, knobs)
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(UserError, match=match):
        sampling.sample(sampler, GaussianDenoiser(), x, _sigmas(3), **knobs)


def test_knobs_in_range_pass():
    sampling.check_knobs("euler", {"s_churn": 40, "s_tmin": 0.05, "s_tmax": float("inf")})
    sampling.check_knobs("ddim", {"eta": 1})
    sampling.check_knobs("dpmpp_2m_sde", {"eta": 0.0, "s_noise": 1.003})


def test_non_finite_denoiser_output_fails_with_the_step():
    """A denoiser that returns NaN from its third call on: the sampler stops there with a
    NonFiniteError naming step 3 (it does not run on and return a NaN sample)."""
    calls = []

    def broken(x, sigma, **cond):
        calls.append(float(sigma[0]))
        out = GaussianDenoiser()(x, sigma)
        return out * float("nan") if len(calls) >= 3 else out

    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    with pytest.raises(sampling.NonFiniteError, match="step 3 of 8"):
        sampling.sample("euler", broken, x, _sigmas(8))
    assert len(calls) == 3


def test_non_finite_start_is_named():
    x = torch.full((1, 2), float("inf"), dtype=torch.float64)
    with pytest.raises(sampling.NonFiniteError, match="in the input"):
        sampling.sample("ddim", lambda x, s, **c: x.clone(), x, _sigmas(4))
