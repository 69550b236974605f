import math

import pytest
import torch

from latentforge import schedules
from latentforge.errors import UserError


@pytest.mark.parametrize("name", schedules.BETA_SCHEDULES)
def test_betas_in_range_and_alpha_bar_decreasing(name):
    betas = schedules.get_betas(name, 1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas < 1).all()
    ab = schedules.alphas_cumprod(betas)
    assert (ab[1:] < ab[:-1]).all()


def test_known_endpoints():
    lin = schedules.get_betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    sl = schedules.get_betas("scaled_linear", 1000)
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    # SD's well-known sigma range for scaled_linear: 0.0292 .. 14.6146
    sig = schedules.alpha_bar_to_sigma(schedules.alphas_cumprod(sl))
    assert sig[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sig[-1].item() == pytest.approx(14.6146, abs=1e-3)
    cos = schedules.alphas_cumprod(schedules.get_betas("cosine", 1000))
    assert cos[0].item() == pytest.approx(1.0, abs=1e-3) and cos[-1].item() < 1e-4


def test_zero_terminal_snr():
    betas = schedules.rescale_zero_terminal_snr(schedules.get_betas("scaled_linear", 1000))
    ab = schedules.alphas_cumprod(betas)
    assert ab[-1].item() == pytest.approx(0.0, abs=1e-12)
    # the first step's alpha_bar is unchanged
    ref = schedules.alphas_cumprod(schedules.get_betas("scaled_linear", 1000))
    assert ab[0].item() == pytest.approx(ref[0].item(), rel=1e-9)
    assert torch.isfinite(schedules.alpha_bar_to_sigma(ab)).all()


def test_sigma_alpha_bar_round_trip():
    ab = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    back = schedules.sigma_to_alpha_bar(schedules.alpha_bar_to_sigma(ab))
    assert torch.allclose(back, ab, atol=1e-12)


def test_sigma_t_round_trip():
    table = schedules.alpha_bar_to_sigma(
        schedules.alphas_cumprod(schedules.get_betas("linear", 1000))
    )
    t = torch.tensor([0.0, 0.5, 10.25, 499.0, 998.9, 999.0], dtype=torch.float64)
    sigma = schedules.t_to_sigma(t, table)
    assert torch.allclose(schedules.sigma_to_t(sigma, table), t, atol=1e-6)
    # integer timesteps land exactly on the table
    assert torch.allclose(schedules.t_to_sigma(torch.arange(1000.0), table), table)


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("steps", [1, 5, 20])
def test_spacings_decrease_to_zero(spacing, steps):
    table = schedules.alpha_bar_to_sigma(
        schedules.alphas_cumprod(schedules.get_betas("scaled_linear", 1000))
    )
    sig = schedules.get_sigmas(
        spacing, steps, sigma_min=float(table[0]), sigma_max=float(table[-1]), train_sigmas=table
    )
    assert sig.shape == (steps + 1,) and sig[-1] == 0
    assert (sig[1:] < sig[:-1]).all()
    assert sig[0] <= table[-1] + 1e-6


def test_karras_endpoints_and_trailing_starts_at_last_timestep():
    sig = schedules.get_sigmas("karras", 10, sigma_min=0.002, sigma_max=80.0)
    assert sig[0].item() == pytest.approx(80.0) and sig[-2].item() == pytest.approx(0.002)
    assert schedules.discrete_timesteps("trailing", 10, 1000)[0] == 999
    assert schedules.discrete_timesteps("leading", 10, 1000).tolist()[:2] == [901, 801]
    exp = schedules.get_sigmas("exponential", 4, sigma_min=1.0, sigma_max=8.0)[:-1]
    assert torch.allclose(exp.log().diff(), torch.full((3,), -math.log(2), dtype=exp.dtype))


def test_bad_input():
    with pytest.raises(UserError, match="unknown sigma spacing"):
        schedules.get_sigmas("nope", 10, sigma_min=0.1, sigma_max=10)
    with pytest.raises(UserError, match="positive"):
        schedules.get_sigmas("karras", 0, sigma_min=0.1, sigma_max=10)
    with pytest.raises(UserError, match="unknown beta schedule"):
        schedules.get_betas("quadratic")
    with pytest.raises(UserError, match="discrete"):
        schedules.get_sigmas("trailing", 5, sigma_min=0.1, sigma_max=10)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 13, 50])
def test_lcm_spacing_is_diffusers_lcm_scheduler(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.LCMScheduler()
    ref.set_timesteps(steps)
    ours = schedules.discrete_timesteps("lcm", steps, 1000)
    assert ours.long().tolist() == ref.timesteps.tolist()
    with pytest.raises(UserError, match="at most 50"):
        schedules.discrete_timesteps("lcm", 51, 1000)
