"""Few-step distillation of a text / class diffusion model folder into a guidance-embedding student.

Two methods, one trainer on the generic loop (resume, checkpoints, torchrun):

- ``lcm``: latent consistency distillation (Song et al. 2023; LCM, Luo et al. 2023, Alg. 1). A
  point of the teacher's skipping-step DDIM grid (k = 1000 / ddim_timesteps) is noised from
  data, the teacher takes one classifier-free-guided DDIM step (scale g ~ U[g_min, g_max] per
  example) to the grid point below, and the student f(x, t, g) is pulled (Huber or L2) to the
  EMA target network's f at that point. f carries LCM's c_skip / c_out (`ConsistencyDenoiser`),
  so f(x, sigma_min) = x: the boundary condition that anchors the chain.
- ``progressive``: progressive distillation (Salimans & Ho 2022) with guidance folded in
  (Meng et al. 2023): each round halves the steps, the student's one DDIM step matching the
  guided teacher's two (the x0 target of eq. 8 in the student's v-space, weighted by
  max(SNR, 1)); the student of a round is the next round's teacher.

The student starts as the teacher (same weights; the guidance embedding's projection is
zero-initialised), so it begins computing the teacher's conditional prediction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..denoisers import make_denoiser
from ..errors import UserError
from ..io.model_folder import (
    ModelMeta,
    build_denoiser,
    load_model_folder,
    model_dir,
    read_model_meta,
    wrap_consistency,
)
from ..schedules import discrete_timesteps
from .diffusion import DiffusionTrainer
from .loop import run_training

METHODS = ("lcm", "progressive")
LOSSES = ("huber", "l2")
GUIDANCE_DIM = 256  # width of the guidance-scale Fourier features (LCM-SD uses 256)
LCM_PARAMETERIZATION = {"sigma_data": 0.5, "timestep_scaling": 10.0}  # diffusers' LCMScheduler


@dataclass
class DistillConfig:
    """The settings of `latentforge distill`. `data` defaults to the teacher's data spec, `vae`
    to its VAE sub-folder (set from `model` when the run is built)."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({
        "out", "max_steps", "ckpt_every", "sample_every", "keep_checkpoints", "quiet",
        "lr_schedule", "cache_latents", "cache_text", "cache_dir",
    })  # fmt: skip
    model: str
    out: str
    method: str = "lcm"
    data: str = ""
    steps: int = 4  # the student's default sampling steps (lcm)
    from_steps: int = 16  # progressive: the teacher's DDIM steps ...
    to_steps: int = 4  # ... halved round by round down to these
    ddim_timesteps: int = 50  # lcm: the skipping-step grid (k = 1000 / ddim_timesteps)
    guidance_min: float = 1.0  # the guidance scale g ~ U[guidance_min, guidance_max] per example
    guidance_max: float = 5.0
    guidance: float | None = None  # the student's default g (None: the teacher's default)
    loss: str = "huber"
    huber_c: float = 0.001
    max_steps: int = 1000  # training steps (per round, for progressive)
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.95  # lcm: the target network's decay (also the saved weights)
    bf16: bool = False
    seed: int = 0
    sample_every: int = 0
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    cache_latents: bool = True
    cache_text: bool = True
    cache_dir: str | None = None
    quiet: bool = False
    oversample: tuple[str, ...] = ()
    vae: str | None = None  # set from the teacher
    round: int = 0  # progressive: which halving this run is (set by `distill`)

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}; choose one of {list(METHODS)}")
        if self.loss not in LOSSES:
            raise UserError(f"unknown --loss {self.loss!r}; choose one of {list(LOSSES)}")
        if not 1 <= self.guidance_min <= self.guidance_max:
            raise UserError("guidance range needs 1 <= --guidance-min <= --guidance-max")
        if not 1 <= self.ddim_timesteps <= 1000 or 1000 % self.ddim_timesteps:
            raise UserError(f"--ddim-timesteps must divide 1000, got {self.ddim_timesteps}")
        if self.method == "progressive":
            k, n = self.to_steps, self.from_steps
            if k < 1 or n <= k or n % k or (n // k) & (n // k - 1):
                raise UserError(f"--from-steps {n} must be --to-steps {k} times a power of 2")


class DistillTrainer(DiffusionTrainer):
    """The student (a copy of the teacher's U-Net with a guidance embedding) trained against the
    frozen teacher; data, latent and caption caches as `DiffusionTrainer`'s."""

    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig) -> None:
        super().__init__(cfg)
        # The student trains on its raw x0 (no clip_denoised clamp: a clamped output has no
        # gradient and cannot reach a target outside the clamp); the teacher samples as it does.
        raw = {**self.meta.parameterization, "clip_denoised": None}
        self.denoiser = make_denoiser(self.ddp, raw).to(self.device)
        self.student = wrap_consistency(self.denoiser, self.meta)
        self.target = wrap_consistency(make_denoiser(self.ema, raw).to(self.device), self.meta)
        self.teacher = self.teacher.to(self.device)

    # ----- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        from ..io.model_folder import load_vae
        from ..models.text import build_text_encoder

        cfg = self.cfg
        teacher_meta, state = load_model_folder(cfg.model)
        if teacher_meta.task != "generate" or teacher_meta.conditioning == "none":
            raise UserError(f"{cfg.model}: distillation needs a class or text text-to-image model")
        if (teacher_meta.parameterization or {}).get("type", "vp") != "vp":
            raise UserError(f"{cfg.model}: distillation needs a vp (discrete-time) model")
        self.teacher = build_denoiser(teacher_meta, state)
        self.teacher_embeds_guidance = teacher_meta.guidance_embedding is not None
        if teacher_meta.parameterization.get("consistency"):
            raise UserError(f"{cfg.model} is a consistency model; distil its teacher instead")
        self.text_encoder, self._text_table = None, None
        if teacher_meta.text_encoder:
            self.text_encoder = build_text_encoder(teacher_meta.text_encoder, cfg.model)
            self.text_encoder.to(self.device)
        self.vae, self.scaling_factor = None, 1.0
        if teacher_meta.latent is not None:
            self.vae, _ = load_vae(cfg.vae)
            self.vae.to(self.device)
            self.scaling_factor = teacher_meta.latent.scaling_factor
        self.meta = self.student_meta(teacher_meta)
        self.model = build_denoiser(self.meta).model  # a fresh U-Net with the embedding
        own = self.model.state_dict()
        state = dict(state)
        if "time_embedding.cond_proj.weight" not in state:  # zero-initialised: starts as teacher
            state["time_embedding.cond_proj.weight"] = own["time_embedding.cond_proj.weight"]
        self.model.load_state_dict(state, strict=True)

    def student_meta(self, teacher: ModelMeta) -> ModelMeta:
        """The teacher's description with the guidance embedding, the student's sampling
        defaults (guidance folded in: one pass a step) and provenance."""
        cfg = self.cfg
        g = teacher.defaults.guidance if cfg.guidance is None else cfg.guidance
        param = dict(teacher.parameterization)
        if cfg.method == "lcm":
            param["consistency"] = dict(LCM_PARAMETERIZATION)
        sampler, steps = ("lcm", cfg.steps) if cfg.method == "lcm" else ("ddim", self.student_steps)
        return teacher.with_defaults(
            sampler=sampler, steps=steps, spacing="trailing", guidance=1.0, guidance_interval=None
        ).replace(
            parameterization=param,
            guidance_embedding={"time_cond_proj_dim": GUIDANCE_DIM, "guidance": g},
            init_from={"folder": str(Path(cfg.model).resolve()), "distill": cfg.method},
            training=None,
        )

    @property
    def student_steps(self) -> int:
        return self.cfg.from_steps // 2 ** (self.cfg.round + 1)

    # ----- the losses ------------------------------------------------------------------------
    def conditions(self, batch: dict, g: torch.Generator) -> tuple[dict, dict, torch.Tensor]:
        """(cond, uncond, guidance scales) for a batch: captions or labels, the empty prompt /
        null class, and g ~ U[guidance_min, guidance_max] per example."""
        n = len(batch["index"])
        if self.text_encoder is not None:
            keep = torch.zeros(n, dtype=torch.bool, device=self.device)
            context, mask = self.text_context(batch, keep)
            u_context, u_mask = self.text_context(batch, ~keep)
            cond = {"context": context, "context_mask": mask}
            uncond = {"context": u_context, "context_mask": u_mask}
        else:
            labels = batch["label"].to(self.device)
            cond = {"class_labels": labels}
            uncond = {"class_labels": torch.full_like(labels, self.meta.num_classes)}
        lo, hi = self.cfg.guidance_min, self.cfg.guidance_max
        scale = lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)
        return cond, uncond, scale

    @torch.no_grad()
    def guided_teacher(self, x, sigma, cond: dict, uncond: dict, scale: torch.Tensor):
        """The teacher's classifier-free-guided x0 (Ho & Salimans 2022) at per-example scales;
        one call for a teacher that embeds the scale (a progressive round's previous student)."""
        if self.teacher_embeds_guidance:
            return self.teacher(x, sigma, **cond, guidance=scale)
        both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
        u, c = self.teacher(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return u + _expand(scale, x) * (c - u)

    def compute_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        x0 = self.latents(batch, g)
        cond, uncond, scale = self.conditions(batch, g)
        if self.cfg.method == "lcm":
            return self.lcm_loss(x0, cond, uncond, scale, g)
        return self.progressive_loss(x0, cond, uncond, scale, g)

    def lcm_loss(self, x0, cond, uncond, scale, g) -> torch.Tensor:
        """LCM Alg. 1: a DDIM step of the guided teacher from t_{n+k} to t_n, and the distance
        between the student's f there and the EMA target's f at the teacher's point."""
        sigmas = self.teacher.train_sigmas  # (1000,), increasing in t
        k = len(sigmas) // self.cfg.ddim_timesteps
        n = torch.randint(1, self.cfg.ddim_timesteps + 1, (len(x0),), generator=g, device=g.device)
        t = n * k - 1  # the grid k-1, 2k-1, ..., 999; the point below t = k-1 is t = 0
        sigma, sigma_prev = sigmas[t], sigmas[(t - k).clamp(min=0)]
        noise = torch.randn(x0.shape, generator=g, device=g.device)
        x = x0 + _expand(sigma, x0) * noise
        teacher_x0 = self.guided_teacher(x, sigma, cond, uncond, scale)
        # DDIM (eta 0) is Euler in sigma: x_prev = x0 + sigma_prev * eps_hat
        x_prev = teacher_x0 + _expand(sigma_prev / sigma, x0) * (x - teacher_x0)
        with torch.no_grad():
            target = self.target(x_prev, sigma_prev, **cond, guidance=scale)
        pred = self.student(x, sigma, **cond, guidance=scale)
        return self.distance(pred, target)

    def progressive_loss(self, x0, cond, uncond, scale, g) -> torch.Tensor:
        """Salimans & Ho 2022, Alg. 2: two guided teacher DDIM steps t -> t' -> t'' on the
        student's grid of N steps; the student's one step t -> t'' must land on the same point,
        i.e. predict x0_target = (x'' - (s''/s) x) / (1 - s''/s) (VE form of eq. 8)."""
        sigmas = self._round_sigmas()  # (2N + 1,) the teacher's levels, decreasing to ~0
        n_student = (len(sigmas) - 1) // 2
        i = torch.randint(0, n_student, (len(x0),), generator=g, device=g.device) * 2
        s, s_mid, s_end = sigmas[i], sigmas[i + 1], sigmas[i + 2]
        noise = torch.randn(x0.shape, generator=g, device=g.device)
        x = x0 + _expand(s, x0) * noise
        with torch.no_grad():
            d1 = self.guided_teacher(x, s, cond, uncond, scale)
            x_mid = d1 + _expand(s_mid / s, x0) * (x - d1)
            d2 = self.guided_teacher(x_mid, s_mid, cond, uncond, scale)
            x_end = d2 + _expand(s_end / s_mid, x0) * (x_mid - d2)
            ratio = _expand(s_end / s, x0)
            target = (x_end - ratio * x) / (1 - ratio)
        pred = self.student(x, s, **cond, guidance=scale)
        weight = (1 / s.double() ** 2).clamp(min=1.0).float()  # max(SNR, 1): truncated SNR
        return (weight * (pred.float() - target.float()).pow(2).flatten(1).mean(1)).mean()

    def _round_sigmas(self) -> torch.Tensor:
        """The teacher's 2N levels of this round (trailing DDIM spacing), ending at sigma_min
        (a DDIM step to 0 lands on the teacher's x0 itself)."""
        steps = self.student_steps * 2
        t = discrete_timesteps("trailing", steps, len(self.teacher.train_sigmas))
        sigmas = self.teacher.train_sigmas[t.long().to(self.device)]
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example Huber (pseudo-Huber, c = huber_c; LCM) or squared error, averaged."""
        diff = (pred.float() - target.float()).flatten(1)
        if self.cfg.loss == "l2":
            return diff.pow(2).mean()
        c = self.cfg.huber_c
        return ((diff.pow(2) + c**2).sqrt() - c).mean()


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def distill(cfg: DistillConfig, resume: bool = False, resume_override=()) -> int:
    """Run a distillation: one run for lcm; for progressive, one run per halving (each round's
    student in out/round-R, the last one copied to out)."""
    cfg.check()
    cfg = dataclasses.replace(cfg, model=str(model_dir(cfg.model)))  # "default": the embedded
    teacher = read_model_meta(cfg.model)
    cfg = dataclasses.replace(
        cfg,
        data=cfg.data or teacher.data.spec or "",
        vae=str(Path(cfg.model) / teacher.latent.vae) if teacher.latent else None,
    )
    if not cfg.data:
        raise UserError(f"{cfg.model}: model.json names no data spec; pass --data")
    if cfg.method == "lcm":
        return run_training(DistillTrainer, cfg, resume, resume_override)
    rounds = int(math.log2(cfg.from_steps // cfg.to_steps))
    teacher_dir = cfg.model
    for r in range(rounds):
        out = Path(cfg.out) / f"round-{r}" if r < rounds - 1 else Path(cfg.out)
        round_cfg = dataclasses.replace(cfg, model=teacher_dir, out=str(out), round=r)
        rc = run_training(DistillTrainer, round_cfg, resume, resume_override)
        if rc:
            return rc
        teacher_dir = str(out)
    return 0
