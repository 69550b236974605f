"""Training the KL autoencoder: L1 reconstruction + a small KL term (Rombach et al. 2022, sec. 3).

The latent scaling factor (1 / std of latents over a data sample) and the reconstruction PSNR
on held-out images are measured at every save and stored in model.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..data import held_out_images, random_crops
from ..errors import UserError
from ..io.model_folder import DataInfo, ModelMeta, load_model_folder, save_model_folder
from ..metrics.quality import psnr_db, ssim
from ..models.vae import fit_latent_rgb_map
from .loop import Trainer, run_training


@dataclass
class VAETrainConfig:
    """The settings of one VAE training run (`train vae`'s options), recorded in checkpoints and
    model.json. A `--resume` keeps every one but RESUME_FREE (how long, how often it saves or
    samples, the lr decay after warm-up, how many held-out images measure it), unless
    `--resume-override KEY` names it."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({
        "out", "max_steps", "ckpt_every", "sample_every", "keep_checkpoints", "quiet",
        "lr_schedule", "eval_images",
    })  # fmt: skip
    data: str
    out: str
    preset: str = "f4-tiny"
    max_steps: int = 2000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant, or cosine decay to 0 at max_steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    kl_weight: float = 1e-6
    disc_start: int = 0  # > 0: switch the patch discriminator on at this step (0: never)
    disc_weight: float = 0.1
    loss: str = "l1"
    edge_weight: float = 0.0  # > 0: pixels on or next to an edge of the target weigh 1 + this
    bf16: bool = False
    seed: int = 0
    sample_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    eval_images: int = 256
    crop: int = 0  # train on random crops of this size (0: whole images); eval on whole images
    init_from: str | None = None  # start from this VAE folder's weights (its config, not preset)
    decoder_only: bool = False  # train the decoder alone: the latent space stays the source's
    oversample: tuple[str, ...] = ()  # shapes data: "WORDS=FACTOR" rules (ImageDataset hooks)
    quiet: bool = False


class VAETrainer(Trainer):
    cfg: VAETrainConfig

    def setup(self) -> None:
        from ..models.vae import AutoencoderKL, VAEConfig, vae_preset

        self.source: ModelMeta | None = None
        if self.cfg.decoder_only and not self.cfg.init_from:
            raise UserError("--decoder-only fine-tunes a trained VAE's decoder: give --init-from")
        if self.cfg.init_from:
            self.source, state = _load_source(self.cfg.init_from, self.dataset.channels)
            self.config = VAEConfig.from_dict(self.source.vae)
        else:
            self.config = vae_preset(self.cfg.preset, in_channels=self.dataset.channels,
                                     out_channels=self.dataset.channels)  # fmt: skip
        self.model = AutoencoderKL(self.config)
        if self.source is not None:
            from ..io.checkpoint import load_state_strict

            load_state_strict(self.model, state, f"--init-from {self.cfg.init_from}")
        f, crop, res = self.model.downsample_factor, self.cfg.crop, self.dataset.resolution
        if crop and (crop > res or crop % f):
            raise UserError(f"--crop {crop} must be a multiple of {f} (the VAE's downsampling "
                            f"factor) and at most the image size {res}")  # fmt: skip
        self.disc = self.disc_opt = self._fake = None
        self._eval_images: torch.Tensor | None = None
        if self.cfg.disc_start:
            from ..models.discriminator import PatchDiscriminator

            self.disc = PatchDiscriminator(self.dataset.channels)
            self.disc_opt = torch.optim.AdamW(
                self.disc.parameters(), lr=self.cfg.lr, betas=(0.5, 0.9)
            )
        self.meta = ModelMeta(
            kind="vae",
            vae=self.config.to_dict(),
            data=DataInfo(
                spec=self.cfg.data,
                resolution=self.dataset.resolution,
                channels=self.dataset.channels,
            ),
        )

    def frozen_modules(self) -> list[torch.nn.Module]:
        if self.cfg.decoder_only:  # the latent space stays the source's
            return [self.model.encoder, self.model.quant_conv]
        return []

    def compute_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        x = batch["image"]
        if self.cfg.crop and self.cfg.crop < x.shape[-1]:
            x = random_crops(x, self.cfg.crop, self.model.downsample_factor, g)
        recon, posterior = self.ddp(x, sample_posterior=True, generator=g)
        diff = recon - x
        err = diff.abs() if self.cfg.loss == "l1" else diff.pow(2)
        if self.cfg.edge_weight:
            w = 1 + self.cfg.edge_weight * edge_map(x)
            rec = (err * w).mean() / w.mean()
        else:
            rec = err.mean()
        # LDM weights the per-image KL *sum* against the per-image reconstruction *sum*.
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + self.cfg.kl_weight * kl
        if self._adversarial():
            self._fake = recon.detach()
            self.disc.requires_grad_(False)
            loss = loss - self.cfg.disc_weight * self.disc(recon).mean()  # generator hinge term
            self.disc.requires_grad_(True)
        return loss

    def _adversarial(self) -> bool:
        return self.disc is not None and self.step >= self.cfg.disc_start

    def train_step(self) -> float:
        """The autoencoder step, then (once adversarial) one discriminator step on its batch."""
        loss = super().train_step()
        if self._fake is not None:
            from ..models.discriminator import hinge_d_loss

            real = self.batch(self.step - 1, self.cfg.grad_accum - 1)["image"]
            if real.shape[-1] != self._fake.shape[-1]:  # crops: compare like with like
                real = random_crops(real, self._fake.shape[-1], self.model.downsample_factor,
                                    self.generator(self.step - 1, 1 << 20))  # fmt: skip
            d_loss = hinge_d_loss(self.disc(real), self.disc(self._fake))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            self._fake = None
        return loss

    def checkpointed(self) -> dict:
        extra = {"disc": self.disc, "disc_optimizer": self.disc_opt} if self.disc else {}
        return {**super().checkpointed(), **extra}

    def _held_out(self) -> torch.Tensor:
        """Fixed evaluation images never trained on: for shapes, the first images of the next
        data stream (seed + 1); for fixed datasets (digits, folders), the last indices."""
        if self._eval_images is None:
            ds, n = self.dataset, min(self.cfg.eval_images, len(self.dataset))
            if ds.procedural:
                self._eval_images = held_out_images(self.cfg.data, n, self.cfg.seed + 1)
            else:
                self._eval_images = torch.stack([ds[len(ds) - 1 - i]["image"] for i in range(n)])
        return self._eval_images.to(self.device)

    @torch.no_grad()
    def measure(self) -> dict:
        images = self._held_out()
        latents, recons = [], []
        for chunk in images.split(64):
            posterior = self.ema.encode(chunk)
            latents.append(posterior.sample(torch.Generator().manual_seed(0)).float())
            recons.append(self.ema.decode(posterior.mode()))
        z, recon = torch.cat(latents), torch.cat(recons)
        rgb_map = fit_latent_rgb_map(self.ema, images) if images.shape[1] == 3 else None
        return {
            "scaling_factor": 1.0 / z.flatten().std().item(),
            "latent_rgb": None
            if rgb_map is None
            else [[round(v, 6) for v in row] for row in rgb_map.tolist()],
            "psnr_db": round(psnr_db(recon, images), 3),
            "ssim": round(ssim(recon.cpu(), images.cpu()).mean().item(), 4),
            "eval_images": len(images),
        }

    def sample_images(self) -> torch.Tensor:
        """Originals above their reconstructions."""
        images = self._held_out()[:8]
        with torch.no_grad():
            recon = self.ema.decode(self.ema.encode(images).mode()).clamp(-1, 1)
        return torch.cat([images, recon]).cpu()

    def save_model(self) -> None:
        m = self.measure()
        scaling_factor = m.pop("scaling_factor")
        if self.cfg.decoder_only:
            # the encoder is the source's, bit for bit: keep its scaling factor exactly, so
            # diffusion models trained on the source's latents can swap this VAE in
            scaling_factor = self.source.scaling_factor
        init_from = None
        if self.source is not None:
            init_from = {
                "folder": self.cfg.init_from,
                "decoder_only": self.cfg.decoder_only,
                "psnr_db": (self.source.eval or {}).get("psnr_db"),
            }
        meta = self.meta.replace(
            scaling_factor=scaling_factor,
            init_from=init_from,
            latent_rgb=m.pop("latent_rgb"),  # cheap live previews (models/vae.py)
            eval=m,
            training=self.provenance(),
        )
        save_model_folder(self.out, meta, self.ema.state_dict())


def edge_map(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W) float: 1 on pixels within one pixel of a step of more than `threshold`
    (images in [-1, 1]) between neighbours in any channel, else 0.

    Small shapes are mostly edge: a plain per-pixel loss spends little on a small star's points,
    which a tiny decoder then rounds into a pentagon; weighting edges puts the loss where the
    geometry is.
    """
    x = images.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True)
    step = torch.zeros_like(x[:, :1])
    step[..., :, 1:] = dx
    step[..., :, :-1] = torch.maximum(step[..., :, :-1], dx)
    step[..., 1:, :] = torch.maximum(step[..., 1:, :], dy)
    step[..., :-1, :] = torch.maximum(step[..., :-1, :], dy)
    edges = (step > threshold).float()
    return torch.nn.functional.max_pool2d(edges, 3, stride=1, padding=1)


def _load_source(folder: str, channels: int) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
    meta, state = load_model_folder(folder)
    if meta.kind != "vae":
        raise UserError(f"--init-from {folder} is a {meta.kind!r} folder, not a VAE")
    if meta.vae["in_channels"] != channels:
        raise UserError(f"--init-from {folder} encodes {meta.vae['in_channels']}-channel "
                        f"images; --data has {channels}")  # fmt: skip
    return meta, state


def train_vae(
    cfg: VAETrainConfig, resume: bool = False, resume_override: tuple[str, ...] = ()
) -> int:
    """Train the VAE `cfg` describes; 0, or 130 after saving when SIGTERM / SIGINT arrived.
    `resume_override`: settings a resume may change (`--resume-override`)."""
    return run_training(VAETrainer, cfg, resume, resume_override)
