"""Training a LoRA on a model folder (`latentforge train lora`): the base weights stay frozen,
only the low-rank factors learn (Hu et al. 2021), with the diffusion loss of `DiffusionTrainer`.

Targets: the U-Net's attention projections (default), its convolutions too (`--lora-target
conv`, LoCon), and the text encoder's attention projections (`--train-text-encoder`).
DreamBooth (Ruiz et al. 2023): `--instance-prompt` captions every training image with one
prompt (a rare token, "sks hexagon"); `--class-prompt` draws `--num-class-images` images of the
class from the base model before training and adds their loss, weighted `--prior-weight`
(prior preservation), so the class keeps its look. min-SNR weighting (Hang et al. 2023) and
bf16 come from the diffusion trainer; the generic loop gives checkpoints, exact resume and
torchrun. The result is OUT/lora.safetensors in kohya's or diffusers' keys (`--format`).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..io.lora import TEXT, UNET, denoiser_network, lora_roots, save_lora
from ..models.lora import LoraNetwork, target_layers
from .diffusion import DiffusionTrainer, TrainConfig
from .loop import run_training

LORA_FILE = "lora.safetensors"


@dataclass
class LoraTrainConfig(TrainConfig):
    """`train lora`'s settings: the diffusion trainer's, plus the base model and the LoRA's
    shape. `preset`, `cond`, `vae` and the text-encoder fields are the base model's own."""

    RESUME_FREE: ClassVar[frozenset[str]] = TrainConfig.RESUME_FREE | {"format"}
    model: str | None = None  # the base model folder (None: the embedded default model)
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    lora_target: str = "attn"  # attn | conv (attention projections and every Conv2d)
    train_text_encoder: bool = False
    format: str = "kohya"  # kohya | diffusers (the saved file's keys)
    instance_prompt: str | None = None  # DreamBooth: the caption of every training image
    class_prompt: str | None = None  # DreamBooth: prior preservation on this class's images
    num_class_images: int = 50
    prior_weight: float = 1.0
    lr: float = 1e-4
    warmup_steps: int = 0
    ema_decay: float = 0.0  # the factors as trained
    label_dropout: float = 0.0
    sample_every: int = 0


class _LoraModule(nn.Module):
    """What the loop trains: the LoRA factors (its only parameters) in front of the frozen base
    network, which it calls without owning (so checkpoints and the EMA hold the factors alone)."""

    def __init__(self, net: nn.Module, loras: dict[str, LoraNetwork]):
        super().__init__()
        self._net = weakref.ref(net)
        self.loras = nn.ModuleDict(loras)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._net()(*args, **kwargs)


class LoraTrainer(DiffusionTrainer):
    """A LoRA on a loaded model folder, trained by its denoiser's loss."""

    cfg: LoraTrainConfig

    def __init__(self, cfg: LoraTrainConfig) -> None:
        super().__init__(cfg)
        for lora in self.model.loras.values():  # after the EMA copy: its factors run nowhere
            lora.attach()

    def setup(self) -> None:
        from ..io.model_folder import load_diffusion_model

        cfg = self.cfg
        if cfg.rank < 1:
            raise UserError(f"--rank must be >= 1, got {cfg.rank}")
        if cfg.lora_target not in ("attn", "conv"):
            raise UserError(f"--lora-target {cfg.lora_target!r}: use attn or conv")
        if cfg.format not in ("kohya", "diffusers"):
            raise UserError(f"--format {cfg.format!r}: use kohya or diffusers")
        if cfg.cache_text and cfg.train_text_encoder:
            raise UserError("--cache-text encodes captions once; it cannot train the encoder")
        self.base = load_diffusion_model(cfg.model, device=self.device)
        meta = self.base.meta
        if meta.task != "generate":
            raise UserError(f"{self.base.path}: train lora needs a generate model, not {meta.task}")
        _, h, w = meta.output_shape
        if self.dataset.resolution != h or self.dataset.channels != meta.output_shape[0]:
            raise UserError(
                f"{cfg.data!r} gives {self.dataset.resolution}px, {self.dataset.channels}-channel "
                f"images; the model makes {w}x{h}x{meta.output_shape[0]} (folder:PATH:{h})"
            )
        self.vae, self.text_encoder = self.base.vae, self.base.text_encoder
        self.scaling_factor = self.base.scaling_factor
        if cfg.train_text_encoder and self.text_encoder is None:
            raise UserError(f"{self.base.path} has no text encoder to train")
        # the diffusion loss as model.json defines it, with this run's min-SNR weighting
        param = {**meta.parameterization, "min_snr_gamma": cfg.min_snr_gamma}
        self.meta = meta.replace(parameterization=param)
        self.class_images = self._class_images() if cfg.class_prompt else None
        roots = lora_roots(self.base)
        alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        conv = cfg.lora_target == "conv"
        loras = {UNET: LoraNetwork(roots[UNET], target_layers(roots[UNET], conv), cfg.rank, alpha)}
        if cfg.train_text_encoder:
            loras[TEXT] = LoraNetwork(roots[TEXT], target_layers(roots[TEXT]), cfg.rank, alpha)
        self.model = _LoraModule(denoiser_network(self.base), loras)
        self._object_rules = None

    @torch.no_grad()
    def _class_images(self) -> torch.Tensor:
        """DreamBooth's class images: the base model's own, drawn once before training."""
        from ..pipelines.generate import generate

        cfg = self.cfg
        if cfg.num_class_images < 1:
            raise UserError("--class-prompt needs --num-class-images >= 1")
        images = [
            generate(
                self.base,
                prompts=[cfg.class_prompt],
                num=min(16, cfg.num_class_images - i),
                seed=cfg.seed + 1_000_000 + i,
            )
            for i in range(0, cfg.num_class_images, 16)
        ]
        return torch.cat(images).to(self.device)

    def text_context(self, batch: dict, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cfg.train_text_encoder:
            return super().text_context(batch, drop)
        # through the encoder with gradients, no prompt memo (its weights change every step)
        captions = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"], strict=True)]
        return self.text_encoder._encode(captions)

    def compute_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if cfg.instance_prompt:
            batch = {**batch, "caption": [cfg.instance_prompt] * len(batch["caption"])}
        loss = super().compute_loss(batch, g)
        if self.class_images is None:
            return loss
        n = len(batch["caption"])
        pick = torch.randint(0, len(self.class_images), (n,), generator=g, device=g.device)
        prior = {"image": self.class_images[pick], "caption": [cfg.class_prompt] * n,
                 "index": pick, "label": batch["label"]}  # fmt: skip
        return loss + cfg.prior_weight * super().compute_loss(prior, g)

    def sample_images(self, n: int = 4) -> torch.Tensor:
        """The base model with the LoRA as trained so far, on the first captions."""
        from ..pipelines.generate import generate

        prompt = self.cfg.instance_prompt
        prompts = [prompt or self.dataset[i]["caption"] for i in range(n)]
        if self.text_encoder is not None:
            self.text_encoder._cache.clear()  # its states change when it trains
        with torch.no_grad():
            return generate(self.base, prompts=prompts, num=n, seed=0, steps=20)

    def factors(self) -> dict:
        """{(part, layer name): factors} of the EMA copy (the trained factors at decay 0)."""
        return {(part, name): f for part, lora in self.ema.loras.items()
                for name, f in lora.factors().items()}  # fmt: skip

    def save_model(self) -> None:
        """OUT/lora.safetensors, refreshed at each checkpoint."""
        provenance = {"base_model": str(self.base.path), "base_weights": self.base.sha256,
                      "step": self.step, "rank": self.cfg.rank,
                      "config": dataclasses.asdict(self.cfg)}  # fmt: skip
        save_lora(self.out / LORA_FILE, self.factors(), self.cfg.format, provenance)


def train_lora(
    cfg: LoraTrainConfig, resume: bool = False, resume_override: tuple[str, ...] = ()
) -> int:
    """Train the LoRA `cfg` describes; 0, or 130 after saving on SIGTERM / SIGINT."""
    return run_training(LoraTrainer, cfg, resume, resume_override)
