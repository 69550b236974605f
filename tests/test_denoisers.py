import pytest
import torch
from torch import nn

from latentforge import schedules
from latentforge.denoisers import EDMDenoiser, VPDenoiser, make_denoiser, q_posterior, q_sample
from latentforge.errors import UserError
from latentforge.sampling import ancestral_split


def _alpha_bar():
    return schedules.alphas_cumprod(schedules.get_betas("linear", 1000))


def test_forward_process_moments():
    """q(x_t | x0): empirical mean and variance over 200k draws match sqrt(ab) x0, 1 - ab."""
    g = torch.Generator().manual_seed(0)
    ab = _alpha_bar()[400].float()
    x0 = torch.full((200_000, 1), 0.7)
    xt = q_sample(x0, ab, torch.randn(x0.shape, generator=g))
    assert xt.mean().item() == pytest.approx((ab.sqrt() * 0.7).item(), abs=0.01)
    assert xt.var().item() == pytest.approx((1 - ab).item(), rel=0.02)


def test_posterior_matches_gaussian_conditioning():
    """DDPM's closed-form posterior equals conditioning the joint Gaussian of (x_{t-1}, x_t)."""
    ab = _alpha_bar()
    t = 300
    ab_t, ab_p = ab[t], ab[t - 1]
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.5]], dtype=torch.float64)
    mean, var = q_posterior(x0, xt, ab_t, ab_p)
    # joint given x0: x_{t-1} = sqrt(ab_p) x0 + N(0, 1-ab_p); x_t = sqrt(a_t) x_{t-1} + N(0, b_t)
    a_t = ab_t / ab_p
    var_p, cov, var_t = 1 - ab_p, a_t.sqrt() * (1 - ab_p), 1 - ab_t
    mean_ref = ab_p.sqrt() * x0 + cov / var_t * (xt - ab_t.sqrt() * x0)
    var_ref = var_p - cov**2 / var_t
    assert torch.allclose(mean, mean_ref) and torch.allclose(var, var_ref.expand_as(var))


def test_ancestral_step_is_the_ddpm_posterior():
    """An eta=1 sigma-space step, given the true x0, equals q(x_{t-1} | x_t, x0) after scaling."""
    ab = _alpha_bar()
    t = 500
    sig = schedules.alpha_bar_to_sigma(ab)
    x0, xt = torch.tensor(0.4, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    x = xt / ab[t].sqrt()  # VE coordinates
    down, up = ancestral_split(sig[t], sig[t - 1], eta=1.0)
    x_down = x + (x - x0) / sig[t] * (down - sig[t])
    mean, var = q_posterior(x0.view(1, 1), xt.view(1, 1), ab[t], ab[t - 1])
    assert (x_down * ab[t - 1].sqrt()).item() == pytest.approx(mean.item(), rel=1e-9)
    assert (up**2 * ab[t - 1]).item() == pytest.approx(var.item(), rel=1e-9)


class _Oracle(nn.Module):
    """Returns the exact eps / v / x0 for a known x0 (so every parameterization must give x0)."""

    def __init__(self, x0, prediction, den):
        super().__init__()
        self.x0, self.prediction, self.den = x0, prediction, den

    def forward(self, x_t, t, **cond):
        sigma = schedules.t_to_sigma(t, self.den.train_sigmas64).float().view(-1, 1, 1, 1)
        a = 1 / (sigma**2 + 1).sqrt()
        s = sigma * a
        eps = (x_t - a * self.x0) / s
        return {"eps": eps, "v": a * eps - s * self.x0, "x0": self.x0}[self.prediction]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_vp_parameterizations_recover_x0(prediction):
    x0 = torch.randn(2, 3, 4, 4)
    den = VPDenoiser(nn.Identity(), _alpha_bar(), prediction)
    den.model = _Oracle(x0, prediction, den)
    sigma = torch.tensor([0.5, 7.0])
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    assert torch.allclose(den(x, sigma), x0, atol=1e-4)


def test_edm_preconditioning_identities():
    den = EDMDenoiser(nn.Identity(), sigma_data=0.5)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    c_skip, c_out, c_in, c_noise = den.scalings(sigma)
    # Karras et al. Table 1: unit-variance network input and training target
    assert torch.allclose(c_in**2 * (sigma**2 + 0.25), torch.ones(3))
    assert torch.allclose(c_skip + (c_out / 0.5) ** 2, torch.ones(3))
    assert torch.allclose(c_noise, sigma.log() / 4)


def test_losses_and_min_snr_weighting():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 1, 4, 4, generator=g)
    zero = nn.Conv2d(1, 1, 1)
    net = lambda x, t, **c: zero(x)  # noqa: E731
    plain = make_denoiser(net, {"type": "vp", "prediction": "eps"})
    snr = make_denoiser(net, {"type": "vp", "prediction": "eps", "min_snr_gamma": 5.0})
    l1 = plain.loss(x0, torch.Generator().manual_seed(1))
    l2 = snr.loss(x0, torch.Generator().manual_seed(1))
    assert l1.shape == (8,) and (l2 <= l1 + 1e-6).all()  # eps weights min(snr, g) / snr <= 1
    edm = make_denoiser(net, {"type": "edm"})
    assert edm.loss(x0, g).shape == (8,)
    with pytest.raises(UserError):
        make_denoiser(net, {"type": "flow"})
    with pytest.raises(UserError):
        make_denoiser(net, {"type": "vp", "prediction": "score"})
