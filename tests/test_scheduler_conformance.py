"""latentforge's samplers against diffusers' schedulers on the same eps-network, to 1e-4.

Both run from the same unit noise z on SD's discrete schedule: diffusers' standard loop
(`scale_model_input`, network, `step`) against `sampling.sample` over a `VPDenoiser` whose noise
levels are the scheduler's own. The network is a fixed nonlinear function of (x, t), so a
mismatch in timestep conversion, input scaling or update rule shows up in the result.

Step counts divide 1000: diffusers' DDIM steps from t to t - 1000 // steps, which is not its next
listed timestep under trailing spacing otherwise (a quirk no sigma sequence can reproduce).
"""

from __future__ import annotations

import math

import pytest
import torch

from latentforge import sampling
from latentforge.denoisers import VPDenoiser

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
LAST = {"final_sigmas_type": "zero"}
UNIPC = diffusers.UniPCMultistepScheduler
# diffusers (like k-diffusion) ends with x0 = D(x, sigma_last); latentforge's default "ab2" final
# step extrapolates instead (more accurate), so conformance runs ask for the plain one.
PLAIN = {"final_step": "denoised"}


class RoundedT(VPDenoiser):
    """diffusers' DPM-Solver/UniPC with Karras sigmas round the network's timesteps to integers
    while the update uses the exact sigmas; this wrapper does the same."""

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return super().sigma_to_t(sigma).round()


class EpsNet(torch.nn.Module):
    """A smooth stand-in for a trained eps-prediction U-Net: depends on x and t nonlinearly."""

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1)) / 1000
        x64 = x.double()
        mix = x64.roll(1, dims=-1)
        return (0.8 * torch.tanh(x64 + 0.3 * mix) + 0.1 * t * x64 + 0.05 * t).to(x.dtype)


def _diffusers_loop(scheduler, net: EpsNet, z: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(x, t), t.double().expand(x.shape[0]))
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _scheduler_sigmas(scheduler, steps: int) -> torch.Tensor:
    """The levels a scheduler visits, as sigmas ending in 0."""
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas"):
        return scheduler.sigmas.double()
    ab = scheduler.alphas_cumprod.double()[scheduler.timesteps]  # DDIM: the timesteps' levels
    return torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])


CASES = [
    ("ddim", {}, diffusers.DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False}),
    ("ddim", {}, diffusers.DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}),
    ("euler", {}, diffusers.EulerDiscreteScheduler, {}),
    ("euler", {}, diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    ("dpmpp_2m", PLAIN, diffusers.DPMSolverMultistepScheduler, {**LAST}),
    ("dpmpp_2m", PLAIN, diffusers.DPMSolverMultistepScheduler, {**LAST, "use_karras_sigmas": True}),
    ("unipc", {**PLAIN, "variant": "bh2"}, diffusers.UniPCMultistepScheduler, {**LAST}),
    # bh1 with final_sigmas_type="zero" gives NaN in diffusers (B(h) = h is infinite on the
    # last step), so this case stops at sigma_min and compares there
    (
        "unipc",
        {"variant": "bh1"},
        UNIPC,
        {"solver_type": "bh1", "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    ),
    ("unipc", PLAIN, diffusers.UniPCMultistepScheduler, {**LAST, "use_karras_sigmas": True}),
]


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize(("name", "knobs", "cls", "kw"), CASES)
def test_trajectory_matches_diffusers(name, knobs, cls, kw, steps):
    scheduler = cls(**SD, **kw)
    net = EpsNet()
    rounded = kw.get("use_karras_sigmas") and cls is not diffusers.EulerDiscreteScheduler
    den = (RoundedT if rounded else VPDenoiser)(net, scheduler.alphas_cumprod.double(), "eps")
    g = torch.Generator().manual_seed(steps)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    sigmas = _scheduler_sigmas(scheduler, steps)

    fresh = cls(**SD, **kw)
    want = _diffusers_loop(fresh, net, z.float(), steps).double()
    # the same start in VE coordinates: Euler's samples are VE already (and it starts at
    # init_noise_sigma = sigma_max, not sqrt(1 + sigma_max^2)); the others' samples are VP
    start = z * float(fresh.init_noise_sigma)
    x_T = (
        start if cls is diffusers.EulerDiscreteScheduler else start * math.sqrt(1 + sigmas[0] ** 2)
    )
    got = sampling.sample(name, den, x_T.float(), sigmas.float(), **knobs).double()
    if sigmas[-1] > 0 and cls is not diffusers.EulerDiscreteScheduler:  # VP coordinates there
        got = got / math.sqrt(1 + sigmas[-1] ** 2)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())
