"""Load a model folder and sample images from it: the one text2img/class2img composition.

encode conditioning -> prior noise -> sampler (any registered one) -> images in [-1, 1].
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .. import sampling, schedules
from ..denoisers import make_denoiser
from ..errors import UserError
from ..guidance import CFGDenoiser
from ..io.checkpoint import MODEL_WEIGHTS, load_model_folder, load_state_strict
from ..models.presets import UNetConfig
from ..models.unet import UNet

DEFAULT_MODEL = "default"


def default_model_dir() -> Path:
    """The embedded default model that ships inside the package."""
    return Path(str(resources.files("latentforge") / "assets" / DEFAULT_MODEL))


@dataclass
class LoadedModel:
    denoiser: nn.Module
    meta: dict
    path: Path
    sha256: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.meta["unet"].get("num_classes", 0)

    @property
    def class_names(self) -> list[str]:
        return self.meta.get("data", {}).get("class_names", [])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of what the denoiser works on (pixels, or latents for a latent model)."""
        data = self.meta["data"]
        return data["channels"], data["resolution"], data["resolution"]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the denoiser's space (identity for pixel-space models)."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's space -> images in [-1, 1] (identity for pixel-space models)."""
        return x


def build_denoiser(meta: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    unet = UNet(UNetConfig.from_dict(meta["unet"]))
    if state is not None:
        load_state_strict(unet, state, "U-Net")
    unet.eval().requires_grad_(False)
    return make_denoiser(unet, meta["parameterization"])


def load_diffusion_model(path: str | Path | None = None) -> LoadedModel:
    """Load a native model folder; None means the embedded default model."""
    folder = default_model_dir() if path is None else Path(path)
    meta, state = load_model_folder(folder)
    if meta.get("kind") != "diffusion":
        raise UserError(f"{folder}: model kind {meta.get('kind')!r} is not a diffusion model")
    digest = hashlib.sha256((folder / MODEL_WEIGHTS).read_bytes()).hexdigest()[:16]
    return LoadedModel(build_denoiser(meta, state), meta, folder, digest)


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def labels_from_prompt(prompt: str, class_names: list[str]) -> int | None:
    """The class a prompt names (a class name or a digit word / numeral), or None."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    names = [n.lower() for n in class_names]
    for w in words:
        if w in names:
            return names.index(w)
        if w in _NUMBER_WORDS and str(_NUMBER_WORDS.index(w)) in names:
            return names.index(str(_NUMBER_WORDS.index(w)))
    return None


def make_sigmas(model: LoadedModel, steps: int, spacing: str | None = None) -> torch.Tensor:
    den = model.denoiser
    spacing = spacing or model.meta.get("sampling", {}).get("spacing", "karras")
    return schedules.get_sigmas(
        spacing,
        steps,
        sigma_min=den.sigma_min,
        sigma_max=den.sigma_max,
        train_sigmas=getattr(den, "train_sigmas64", None),
    )


def conditioning(
    model: LoadedModel,
    num: int,
    *,
    labels: list[int | None] | None = None,
    guidance: float = 1.0,
) -> tuple[nn.Module, dict]:
    """The denoiser to sample (CFG-wrapped when guidance != 1) and its per-image cond dict.

    Every pipeline (text2img, img2img, inpaint, interpolate) conditions through this one place.
    """
    denoiser, cond = model.denoiser, {}
    if model.num_classes:
        null = model.num_classes
        labels = labels or [None] * num
        if len(labels) == 1 and num > 1:
            labels = labels * num
        if len(labels) != num:
            raise UserError(f"got {len(labels)} labels for {num} images")
        ids = torch.tensor([null if lab is None else int(lab) for lab in labels])
        if ((ids < 0) | (ids > null)).any():
            raise UserError(f"labels must be in 0..{null - 1}")
        cond = {"class_labels": ids}
        if guidance != 1.0:
            denoiser = CFGDenoiser(denoiser, guidance, {"class_labels": torch.full_like(ids, null)})
    return denoiser, cond


def sampling_defaults(
    model: LoadedModel, sampler: str | None, steps: int | None, guidance: float | None
) -> tuple[str, int, float]:
    """Fill unset sampler / steps / guidance from the model folder's defaults and validate."""
    defaults = model.meta.get("sampling", {})
    sampler = sampler or defaults.get("sampler", "ddim")
    steps = defaults.get("steps", 20) if steps is None else steps
    guidance = defaults.get("guidance", 1.0) if guidance is None else guidance
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps}")
    sampling.get_sampler(sampler)  # validate the name before any work
    return sampler, steps, guidance


@torch.no_grad()
def generate(
    model: LoadedModel,
    *,
    labels: list[int | None] | None = None,
    num: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    guidance: float | None = None,
    callback: sampling.Callback = None,
    **knobs,
) -> torch.Tensor:
    """Sample `num` images (B, C, H, W) in [-1, 1]; image i uses seed `seed + i`.

    labels: one class per image (None = unconditional); guidance > 1 applies CFG against the
    null class.
    """
    if num < 1:
        raise UserError(f"num must be >= 1, got {num}")
    sampler, steps, guidance = sampling_defaults(model, sampler, steps, guidance)
    sigmas = make_sigmas(model, steps, spacing)
    gen = sampling.BatchGenerator(range(seed, seed + num))
    x = sampling.prior_noise(model.denoiser, (num, *model.image_shape), float(sigmas[0]), gen)
    denoiser, cond = conditioning(model, num, labels=labels, guidance=guidance)
    out = sampling.sample(
        sampler, denoiser, x, sigmas, cond=cond, generator=gen, callback=callback, **knobs
    )
    return model.decode(out).clamp(-1, 1)
