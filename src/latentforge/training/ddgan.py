"""`latentforge train ddgan`: the denoising-diffusion GAN (Xiao, Kreis and Vahdat 2022).

A diffusion model of T = 1-4 steps whose reverse step is learned adversarially: the generator
(the project's U-Net) denoises x_t to x0_hat, the posterior q(x_{t-1} | x_t, x0_hat) draws
x_{t-1}, and a time-conditional discriminator (`models/ddgan.py`) tells those pairs from real
ones. The T noise levels are the model's 1000-step schedule at T trailing timesteps (999, 749,
499, 249 for T = 4), so the result is an ordinary model folder sampled by `ddpm` (exactly that
posterior draw) in T trailing steps, and a trained diffusion model can be the generator's
start (`--init-from`, same prediction): `generate`, the server and `eval` need no special case.

Everything but the loss is the diffusion trainer's (pixel or latent data, class or text
conditioning with caption dropout, EMA, checkpoints, exact resume, torchrun): its
`compute_loss` builds the conditioning, and `diffusion_loss` is the GAN's here.

One optimizer steps both players at once (simultaneous gradient descent): the discriminator's
loss sees the generated pair detached, and the generator's loss reads the discriminator
through detached weights (`torch.func.functional_call`), so one backward gives each player the
gradient of its own loss only. Adam's betas are DDGAN's (0.5, 0.9). The latent z of the
paper's generator is left out: the posterior's noise is the generator's only randomness (the
paper's "no latent" ablation), which keeps the sampler the plain `ddpm`. `--recon-weight`
adds the x0 regression error to the generator's loss (0, the paper's method, by default): an
adversarial term alone pulls a generator started from a diffusion model (`--init-from`) away
from what it knew before the discriminator has learned anything (measured in
docs/few-step.md), as adversarial diffusion distillation (Sauer et al. 2023) also found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..io.model_folder import ModelMeta
from ..models.ddgan import TimeDiscriminator
from ..schedules import discrete_timesteps
from .diffusion import DiffusionTrainer, TrainConfig
from .loop import run_training


@dataclass
class DDGANConfig(TrainConfig):
    """`train ddgan`'s settings: the diffusion trainer's, plus the GAN's."""

    RESUME_FREE: ClassVar[frozenset[str]] = TrainConfig.RESUME_FREE
    num_steps: int = 4  # T: the noise levels trained on, and the sampling steps
    disc_channels: tuple[int, ...] = (32, 64, 128)
    r1_gamma: float = 0.05  # R1 penalty on the discriminator's gradient at real pairs
    recon_weight: float = 0.0  # + this x mean squared x0 error in the generator's loss
    prediction: str = "x0"
    lr: float = 2e-4
    warmup_steps: int = 0
    ema_decay: float = 0.999
    label_dropout: float = 0.0
    min_snr_gamma: float | None = None
    grad_clip: float = 0.0


class _Players(nn.Module):
    """What the loop trains: the generator (called as the denoiser's network) and the
    discriminator (called by the GAN loss)."""

    def __init__(self, generator: nn.Module, discriminator: TimeDiscriminator):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.generator(*args, **kwargs)


def posterior(
    x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, sigma_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q(x_prev | x_t, x0) in the sigma parameterization (x = x0 + sigma n):
    mean = x0 + (s_prev / s)^2 (x_t - x0), std = s_prev sqrt(s^2 - s_prev^2) / s; the step
    `sampling.sample_ddpm` takes (tests/test_ddgan.py checks they agree)."""
    ratio = (sigma_prev / sigma) ** 2
    std = sigma_prev * (sigma**2 - sigma_prev**2).clamp(min=0).sqrt() / sigma
    return x0 + _col(ratio, x0) * (x_t - x0), _col(std, x0)


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class DDGANTrainer(DiffusionTrainer):
    cfg: DDGANConfig

    def __init__(self, cfg: DDGANConfig) -> None:
        super().__init__(cfg)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)

    def setup(self) -> None:
        cfg = self.cfg
        if not 1 <= cfg.num_steps <= 8:
            raise UserError(f"--num-steps must be in 1..8, got {cfg.num_steps}")
        if cfg.task != "generate" or cfg.object_weight or cfg.region_captions:
            raise UserError("train ddgan trains plain generation (no --task, --object-weight, "
                            "--region-captions)")  # fmt: skip
        if cfg.r1_gamma < 0 or cfg.recon_weight < 0:
            raise UserError("--r1-gamma and --recon-weight must be >= 0")
        super().setup()
        unet = self.model.config
        disc = TimeDiscriminator(
            self.meta.data.channels,
            tuple(cfg.disc_channels),
            context_dim=unet.cross_attention_dim,
            num_classes=self.meta.num_classes,
            groups=unet.norm_groups,
        )
        self.model = _Players(self.model, disc)

    def build_meta(self) -> ModelMeta:
        meta = super().build_meta()
        param = {**meta.parameterization, "min_snr_gamma": None}
        sampling = dataclasses.replace(
            meta.sampling, sampler="ddpm", steps=self.cfg.num_steps, spacing="trailing",
            guidance=1.0,
        )  # fmt: skip
        return meta.replace(parameterization=param, sampling=sampling)

    def diffusion_loss(self, x0: torch.Tensor, g: torch.Generator, **cond) -> torch.Tensor:
        """Per-example discriminator + generator losses (`gan_losses`), one backward for both."""
        loss_d, loss_g = self.gan_losses(x0, g, **cond)
        return loss_d + loss_g

    def gan_losses(
        self, x0: torch.Tensor, g: torch.Generator, **cond
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(discriminator loss, generator loss) per example: non-saturating, R1 on real pairs.
        The first has no gradient into the generator, the second none into the discriminator."""
        den, disc = self.denoiser, self.model.discriminator
        n, T = x0.shape[0], self.cfg.num_steps
        k = torch.randint(0, T, (n,), generator=g, device=x0.device)
        levels = self.levels().to(x0.device)
        s, s_prev = levels[k + 1], levels[k]
        x_prev = x0 + _col(s_prev, x0) * torch.randn(x0.shape, generator=g, device=x0.device)
        step = (s**2 - s_prev**2).sqrt()
        x_t = x_prev + _col(step, x0) * torch.randn(x0.shape, generator=g, device=x0.device)
        x0_hat = den(x_t, s, **cond)  # the generator, through self.ddp
        mean, std = posterior(x0_hat, x_t, s, s_prev)
        fake = mean + std * torch.randn(x0.shape, generator=g, device=x0.device)

        # the discriminator sees unit-variance inputs: x / sqrt(1 + sigma^2) (the VP scale)
        def d(net_call, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            a = a / _col((1 + s_prev**2).sqrt(), a)
            return net_call(a, b / _col((1 + s**2).sqrt(), b), k.to(x0.dtype), **d_cond)

        d_cond = {key: cond[key] for key in ("context", "context_mask", "class_labels")
                  if key in cond}  # fmt: skip
        real_in = x_prev.detach().requires_grad_(self.cfg.r1_gamma > 0)
        real = d(disc, real_in, x_t)
        loss_d = F.softplus(-real) + F.softplus(d(disc, fake.detach(), x_t))
        if self.cfg.r1_gamma > 0:
            (grad,) = torch.autograd.grad(real.sum(), real_in, create_graph=True)
            loss_d = loss_d + self.cfg.r1_gamma / 2 * grad.pow(2).flatten(1).sum(1)
        frozen = {name: p.detach() for name, p in disc.named_parameters()}

        def d_frozen(*args, **kwargs) -> torch.Tensor:
            return torch.func.functional_call(disc, frozen, args, kwargs)

        loss_g = F.softplus(-d(d_frozen, fake, x_t))
        if self.cfg.recon_weight:  # keeps a fine-tuned generator near its regression target
            err = (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(1)
            loss_g = loss_g + self.cfg.recon_weight * err
        return loss_d, loss_g

    def levels(self) -> torch.Tensor:
        """(T + 1,) noise levels, ascending: 0 (the data), then the schedule's sigmas at the
        timesteps `ddpm` samples with T trailing steps."""
        den, T = self.denoiser, self.cfg.num_steps
        t = discrete_timesteps("trailing", T, den.num_timesteps).long().flip(0)
        return torch.cat([den.train_sigmas.new_zeros(1), den.train_sigmas[t]])

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The model folder holds the generator alone (the discriminator is in checkpoints)."""
        prefix = "generator."
        state = super().ema_state()
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def train_ddgan(
    cfg: DDGANConfig, resume: bool = False, resume_override: tuple[str, ...] = ()
) -> int:
    """Train the DDGAN `cfg` describes; 0, or 130 after saving on SIGTERM / SIGINT."""
    return run_training(DDGANTrainer, cfg, resume, resume_override)
