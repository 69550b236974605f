"""Trainers for image-conditioned models, chosen by `TrainConfig.task`.

`superres` (SR3, Saharia et al. 2022): the target is the dataset image at full resolution
(pixels, or its latents with --vae); the network also sees the image area-downsampled by
`scale`, resized back to the denoiser's resolution and noised with a random augmentation level
in [0, 0.3] that it is told (Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.2).
`inpaint` (SD-inpainting, Rombach et al. 2022): the network also sees a random mask and the
image with the masked part blanked (its VAE latent for latent models).

Both concatenate their conditioning to x (`models/conditioned.py`), handed to the loss by
`task_cond` (`DiffusionTrainer.compute_loss`); class / text conditioning and everything else
work as in `DiffusionTrainer`.

`train_diffusion`, the entry point of `train diffusion`, lives here: this module knows every
diffusion trainer class, and the generic loop (`loop.py`) needs none of them.
"""

from __future__ import annotations

import math

import torch

from ..data import random_crops
from ..errors import UserError
from ..io.model_folder import ModelMeta
from ..models.conditioned import (
    augment,
    downsample,
    inpaint_condition,
    lowres_condition,
    masked_image,
)
from ..pipelines.superres import DEFAULT_NOISE_LEVEL
from .diffusion import DiffusionTrainer, TrainConfig
from .loop import run_training

TASKS = ("generate", "superres", "inpaint")
SCALES = (2, 4)
MAX_AUG_LEVEL = 0.3  # training augmentation levels are uniform in [0, MAX_AUG_LEVEL]
MASK_KINDS = ("rect", "strokes", "full", "none")
MASK_PROBS = (0.4, 0.4, 0.1, 0.1)


def train_diffusion(
    cfg: TrainConfig, resume: bool = False, resume_override: tuple[str, ...] = ()
) -> int:
    """Train the diffusion model `cfg` describes with the trainer of its `--task`; 0, or 130
    after saving when SIGTERM / SIGINT arrived (`Trainer.fit`). `resume_override`: settings
    a resume may change (`--resume-override`)."""
    return run_training(trainer_for(cfg.task), cfg, resume, resume_override)


def trainer_for(task: str) -> type[DiffusionTrainer]:
    """The trainer class for `--task`."""
    trainers = {
        "generate": DiffusionTrainer,
        "superres": SuperResTrainer,
        "inpaint": InpaintTrainer,
    }
    if task not in trainers:
        raise UserError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return trainers[task]


class _ConcatTrainer(DiffusionTrainer):
    """A DiffusionTrainer whose U-Net also sees `concat_channels()` conditioning channels."""

    task = ""

    def setup(self) -> None:
        if self.cfg.cache_latents:
            raise UserError(f"--cache-latents does not work with --task {self.task}: the "
                            "conditioning is made from the pixel images at every step")  # fmt: skip
        super().setup()

    def concat_channels(self) -> int:
        raise NotImplementedError

    def task_cond(self, batch: dict, g: torch.Generator) -> dict:
        """The extra network inputs for this batch: {"concat": (B, extra, h, w), ...}."""
        raise NotImplementedError

    @property
    def vae_factor(self) -> int:
        """The VAE's downsampling factor f (1 for pixel models)."""
        return self.vae.downsample_factor if self.vae is not None else 1

    def size(self, images: torch.Tensor) -> tuple[int, int]:
        """The denoiser's spatial size for these pixel images (the latent size for latent
        models)."""
        return images.shape[-2] // self.vae_factor, images.shape[-1] // self.vae_factor

    def build_meta(self) -> ModelMeta:
        meta = super().build_meta()
        extra = self.concat_channels()
        unet = {**meta.unet, "in_channels": meta.unet["in_channels"] + extra}
        return meta.replace(unet=unet, task=self.task, scale=self.scale, concat_channels=extra)

    @property
    def scale(self) -> int:
        return 1

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels -> the denoiser's space as sampling encodes them (posterior mode, scaled)."""
        if self.vae is None:
            return images
        return self.vae.encode(images).mode() * self.scaling_factor

    def loaded_ema(self):
        """The EMA weights as a LoadedModel, for the sample grids written while training."""
        from ..io.model_folder import LoadedModel, build_denoiser

        den = build_denoiser(self.meta, self.ema_state())
        model = LoadedModel(self.meta, self.out, denoiser=den)
        model.vae, model.text_encoder = self.vae, self.text_encoder
        return model

    def sample_cond(self, n: int) -> tuple[torch.Tensor, dict]:
        """The first n dataset images and the labels / prompts that go with them."""
        items = [self.dataset[i] for i in range(n)]
        images = torch.stack([it["image"] for it in items])
        kw: dict = {}
        if self.meta.num_classes:
            kw["labels"] = [it["label"] for it in items]
        if self.text_encoder is not None:
            kw["prompts"] = [it["caption"] for it in items]
        return images, kw


class SuperResTrainer(_ConcatTrainer):
    task = "superres"

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.scale not in SCALES:
            raise UserError(f"--scale must be one of {list(SCALES)}, got {cfg.scale}")
        res = self.dataset.resolution
        if res % cfg.scale:
            raise UserError(f"image size {res} is not a multiple of --scale {cfg.scale}")
        super().setup()
        step = self.crop_step
        if cfg.crop and (cfg.crop > res or cfg.crop % step):
            raise UserError(f"--crop {cfg.crop} must be a multiple of {step} (the scale and "
                            f"the VAE's f) and at most the image size {res}")  # fmt: skip

    @property
    def crop_step(self) -> int:
        """Crop sizes and offsets are multiples of this, so a crop's low-res version and its
        latents line up with the whole image's grid."""
        return math.lcm(self.scale, self.vae_factor)

    def compute_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        if self.cfg.crop and self.cfg.crop < batch["image"].shape[-1]:
            crops = random_crops(batch["image"], self.cfg.crop, self.crop_step, g)
            batch = {**batch, "image": crops}
        return super().compute_loss(batch, g)

    @property
    def scale(self) -> int:
        return self.cfg.scale

    def concat_channels(self) -> int:
        # the low-res image in pixel channels, also for latent models (SD x4 upscaler style)
        return self.dataset.channels

    def build_meta(self) -> ModelMeta:
        meta = super().build_meta()
        return meta.with_defaults(noise_level=DEFAULT_NOISE_LEVEL)

    def task_cond(self, batch: dict, g: torch.Generator) -> dict:
        low = downsample(batch["image"], self.scale)  # (B, C, H / s, W / s)
        # (B, C, h, w) at the denoiser's resolution
        cond = lowres_condition(low, self.size(batch["image"]))
        level = torch.rand((cond.shape[0],), generator=g, device=g.device) * MAX_AUG_LEVEL
        noise = torch.randn(cond.shape, generator=g, device=g.device)
        return {"concat": augment(cond, level, noise), "noise_level": level}

    def sample_images(self, n: int = 8, steps: int = 20) -> torch.Tensor:
        """Rows: the low-res input (nearest), the upscaled sample, the original."""
        import torch.nn.functional as F

        from ..pipelines.superres import upscale

        images, kw = self.sample_cond(n)
        low = downsample(images, self.scale)
        out = upscale(self.loaded_ema(), low, steps=steps, **kw)
        shown = F.interpolate(low, size=images.shape[-2:], mode="nearest")
        return torch.cat([shown, out, images])


class InpaintTrainer(_ConcatTrainer):
    task = "inpaint"

    def concat_channels(self) -> int:
        # mask (1) + masked image, in the denoiser's space
        return 1 + (self.vae.latent_channels if self.vae is not None else self.dataset.channels)

    def task_cond(self, batch: dict, g: torch.Generator) -> dict:
        images = batch["image"]
        if g.device.type != "cpu":  # masks are many scalar draws: a CPU generator seeded by g
            seed = int(torch.randint(2**62, (), generator=g, device=g.device))
            g = torch.Generator().manual_seed(seed)
        masks, _ = random_masks(images.shape[0], images.shape[-2:], g)
        masks = masks.to(images.device)
        masked = self.encode(masked_image(images, masks))
        return {"concat": inpaint_condition(masks, masked)}

    def sample_images(self, n: int = 8, steps: int = 20) -> torch.Tensor:
        """Rows: the masked input, the inpainted sample, the original."""
        from ..pipelines.inpaint import inpaint

        images, kw = self.sample_cond(n)
        masks, _ = random_masks(n, images.shape[-2:], torch.Generator().manual_seed(0))
        out = inpaint(self.loaded_ema(), images, masks, steps=steps, **kw)
        return torch.cat([masked_image(images, masks), out, images])


# ----- random training masks -------------------------------------------------------------------
def random_masks(
    n: int, size: tuple[int, int], generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """n masks (n, 1, H, W) in {0, 1} (1 = regenerate) and their kinds: a rectangle, brush
    strokes, the full image (unconditional generation) or nothing (reconstruction), drawn with
    MASK_PROBS. A pure function of the generator's state."""
    H, W = size
    picks = torch.multinomial(torch.tensor(MASK_PROBS), n, replacement=True, generator=generator)
    kinds = [MASK_KINDS[k] for k in picks.tolist()]
    masks = torch.zeros(n, 1, H, W)
    for i, kind in enumerate(kinds):
        if kind == "full":
            masks[i] = 1
        elif kind == "rect":
            masks[i, 0] = _rectangle(H, W, generator)
        elif kind == "strokes":
            masks[i, 0] = _strokes(H, W, generator)
    return masks, kinds


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _rectangle(H: int, W: int, g: torch.Generator) -> torch.Tensor:
    """One axis-aligned box covering 20-70 % of each side, anywhere in the image."""
    h = _randint(g, max(1, round(0.2 * H)), max(1, round(0.7 * H)))
    w = _randint(g, max(1, round(0.2 * W)), max(1, round(0.7 * W)))
    y, x = _randint(g, 0, H - h), _randint(g, 0, W - w)
    mask = torch.zeros(H, W)
    mask[y : y + h, x : x + w] = 1
    return mask


def _strokes(H: int, W: int, g: torch.Generator) -> torch.Tensor:
    """1-4 brush strokes: polylines of 2-5 segments with smoothly turning direction, drawn with
    a round brush of radius 5-12 % of the short side (at least 1 pixel, so never empty)."""
    ys = torch.arange(H, dtype=torch.float32)[:, None] + 0.5  # (H, 1) pixel centres
    xs = torch.arange(W, dtype=torch.float32)[None] + 0.5  # (1, W)
    mask = torch.zeros(H, W, dtype=torch.bool)
    for _ in range(_randint(g, 1, 4)):
        radius = max(1.0, _uniform(g, 0.05, 0.12) * min(H, W))
        py, px = _uniform(g, 0, H), _uniform(g, 0, W)
        angle = _uniform(g, 0, 2 * math.pi)
        for _ in range(_randint(g, 2, 5)):
            angle += _uniform(g, -1.0, 1.0)
            length = _uniform(g, 0.15, 0.45) * max(H, W)
            qy = min(max(py + length * math.sin(angle), 0.0), float(H))
            qx = min(max(px + length * math.cos(angle), 0.0), float(W))
            mask |= _segment_distance(ys, xs, (py, px), (qy, qx)) <= radius
            py, px = qy, qx
    return mask.float()


def _segment_distance(ys, xs, a: tuple[float, float], b: tuple[float, float]) -> torch.Tensor:
    """Distance of every pixel centre to the segment a-b, (H, W)."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    norm = dy * dy + dx * dx
    if norm == 0:
        return ((ys - a[0]) ** 2 + (xs - a[1]) ** 2).sqrt()
    t = (((ys - a[0]) * dy + (xs - a[1]) * dx) / norm).clamp(0, 1)  # (H, W) projection
    return ((ys - a[0] - t * dy) ** 2 + (xs - a[1] - t * dx) ** 2).sqrt()
