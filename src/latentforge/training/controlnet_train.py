"""Training a ControlNet on a model folder (`latentforge train controlnet`), as Zhang, Rao and
Agrawala (2023) do: the U-Net and the text encoder stay frozen; the ControlNet starts as a copy
of the U-Net's encoder with zero convolutions (`ControlNet.from_unet`), so the controlled model
starts as the model itself, and learns by the model's own diffusion loss with its residuals
added to the U-Net's skips. Captions are dropped (`--caption-dropout`, the empty prompt) so the
control works with and without classifier-free guidance.

Control images: each training item's control source (its own image, or what the data's
`control_source` hook draws: the shapes wing draws hand-drawn sketches of its scenes, and its
`control_caption` hook their prompts without what the sketch says) through
the preprocessor `--control`, resized to the model's image size as the pipelines resize a
control image (`pipelines.control.control_images`: bilinear, antialiased). They are made
once, before training, and kept in memory as 8-bit values. The generic loop gives checkpoints,
exact resume and torchrun. The result is the ControlNet model folder OUT (`io/controlnet.py`),
refreshed at each checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from ..io.controlnet import controlnet_meta
from ..io.images import to_pil
from ..io.lora import denoiser_network
from ..io.model_folder import save_model_folder
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.unet import UNet
from ..pipelines.control import Control, ControlledNetwork
from ..preprocess import GREY, PREPROCESSORS, preprocess
from .diffusion import DiffusionTrainer, TrainConfig
from .loop import run_training

MAX_CONTROL_BYTES = 2**31  # the control images are held in memory: at most this many bytes


@dataclass
class ControlNetTrainConfig(TrainConfig):
    """`train controlnet`'s settings: the diffusion trainer's, plus the base model, the
    preprocessor and the control image encoder's widths. `preset`, `cond`, `vae`, `prediction`
    and the text-encoder fields are the base model's own; `label_dropout` is the caption
    dropout."""

    RESUME_FREE: ClassVar[frozenset[str]] = TrainConfig.RESUME_FREE | {"fp16"}
    model: str | None = None  # the base model folder (None: the embedded default model)
    control: str = "scribble"  # the preprocessor (preprocess.PREPROCESSORS)
    embedding_channels: tuple[int, ...] = ()  # () : 16, 32, 64, ... one per VAE halving + 1
    fp16: bool = False  # save the ControlNet's weights in float16
    min_snr_gamma: float | None = None  # plain MSE: the layout is decided at high noise levels
    lr: float = 1e-4
    warmup_steps: int = 0
    ema_decay: float = 0.0  # the ControlNet as trained
    label_dropout: float = 0.3
    sample_every: int = 0


class ControlNetTrainer(DiffusionTrainer):
    """A ControlNet for a loaded model folder; what the loop trains is the frozen U-Net with
    the ControlNet beside it (`pipelines.control.ControlledNetwork`), of which only the
    ControlNet learns."""

    cfg: ControlNetTrainConfig

    def __init__(self, cfg: ControlNetTrainConfig) -> None:
        super().__init__(cfg)
        self.model.network.eval()  # frozen as loaded: no dropout

    def setup(self) -> None:
        from ..io.model_folder import load_diffusion_model

        cfg, ds = self.cfg, self.dataset
        if cfg.control not in PREPROCESSORS:
            raise UserError(f"--control {cfg.control!r}: choose one of "
                            f"{', '.join(sorted(PREPROCESSORS))}")  # fmt: skip
        if ds.streamed:
            raise UserError(f"train controlnet makes every control image once; {cfg.data!r} is a "
                            "stream (use a folder: or shapes spec)")  # fmt: skip
        if cfg.fsdp or cfg.cache_dir:
            raise UserError("train controlnet takes neither --fsdp nor --cache-dir")
        self.base = load_diffusion_model(cfg.model, device=self.device)
        meta = self.base.meta
        if meta.task != "generate":
            raise UserError(f"{self.base.path}: train controlnet needs a generate model, "
                            f"not {meta.task}")  # fmt: skip
        channels, side, _ = meta.output_shape
        if ds.resolution != side or ds.channels != channels:
            raise UserError(f"{cfg.data!r} gives {ds.resolution}px, {ds.channels}-channel images; "
                            f"the model makes {side}x{side}x{channels} "
                            f"(e.g. folder:PATH:{side})")  # fmt: skip
        self.vae, self.text_encoder = self.base.vae, self.base.text_encoder
        self.scaling_factor = self.base.scaling_factor
        # the diffusion loss as model.json defines it, with this run's min-SNR weighting
        param = {**meta.parameterization, "min_snr_gamma": cfg.min_snr_gamma}
        self.meta = meta.replace(parameterization=param)
        unet = denoiser_network(self.base)
        if not isinstance(unet, UNet):
            raise UserError(f"{self.base.path}: a ControlNet steers a plain U-Net, not "
                            f"{type(unet).__name__}")  # fmt: skip
        f = side // meta.image_shape[1]  # the VAE's factor (1: pixels)
        levels = int(math.log2(f)) + 1
        channels = cfg.embedding_channels or tuple(16 * 2**k for k in range(levels))
        if len(channels) != levels or 2 ** (levels - 1) != f:
            raise UserError(f"--embedding-channels needs {levels} widths for a model whose "
                            f"images are {f}x its latents, got {len(channels)}")  # fmt: skip
        config = ControlNetConfig(unet=unet.config, embedding_channels=tuple(channels))
        self.model = ControlledNetwork(unet, [ControlNet.from_unet(unet, config)], [False])
        self._object_rules = None
        self.controls = self._control_table(side)
        captions = [ds.control_caption(i, cfg.control) for i in range(len(ds))]
        self.captions = captions if any(c is not None for c in captions) else None

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.model.network]

    def _control_table(self, side: int) -> torch.Tensor:
        """Every item's control image, (N, C, side, side) uint8 (C = 1 for a preprocessor
        whose output is grey: canny, scribble)."""
        ds, kind = self.dataset, self.cfg.control
        channels = 1 if kind in GREY else 3
        size = len(ds) * channels * side * side
        if size > MAX_CONTROL_BYTES:
            raise UserError(f"{len(ds):,} control images of {side}px need {size / 2**30:.1f} GiB; "
                            f"use a smaller dataset (e.g. N in shapes:RES:N)")  # fmt: skip
        table = np.empty((len(ds), side, side, channels), dtype=np.uint8)
        quiet = self.cfg.quiet or self.rank != 0
        for i in tqdm(range(len(ds)), desc="control images", disable=quiet):
            table[i] = self._control(i, side)[..., :channels]
        return torch.from_numpy(table).permute(0, 3, 1, 2)

    def _control(self, i: int, side: int) -> np.ndarray:
        """Item i's control image, (side, side, 3) uint8, resized as the pipelines resize one
        (bilinear, antialiased: Pillow's resize, which torch's antialiased bilinear matches)."""
        source = self.dataset.control_source(i, self.cfg.control)
        if source is None:
            source = to_pil(self.dataset[i]["image"])
        image = preprocess(source, self.cfg.control)
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def task_cond(self, batch: dict, g: torch.Generator) -> dict:
        """The batch's control images for the ControlledNetwork, at full scale."""
        image = self.controls[batch["index"].cpu()].to(self.device).float() / 255
        n = len(image)
        return {"control_image_0": image.expand(n, 3, *image.shape[-2:]),
                "control_scale": torch.ones(n, 1, device=self.device)}  # fmt: skip

    def compute_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        if self.captions is not None:  # the data's captions for this control (control_caption)
            own = zip(batch["index"].tolist(), batch["caption"], strict=True)
            batch = {**batch, "caption": [self.captions[i] or c for i, c in own]}
        return super().compute_loss(batch, g)

    def controlnet(self) -> ControlNet:
        """The ControlNet as saved: the EMA copy's (the trained one at decay 0)."""
        return self.ema.nets[0]

    def sample_images(self, n: int = 4) -> torch.Tensor:
        """The base model steered by the ControlNet so far: the first items' captions and
        control images."""
        from ..pipelines.generate import generate

        side = self.controls.shape[-1]
        images = self.controls[:n].float().div(255).expand(n, 3, side, side)
        control = Control(self.controlnet(), images)
        prompts = [self.dataset[i]["caption"] for i in range(n)]
        with torch.no_grad():
            return generate(self.base, prompts=prompts, num=n, seed=0, steps=20,
                            controls=[control])  # fmt: skip

    def save_model(self) -> None:
        """OUT: the ControlNet model folder, refreshed at each checkpoint."""
        net = self.controlnet()
        dtype = torch.float16 if self.cfg.fp16 else torch.float32
        state = {k: v.detach().to("cpu", dtype) for k, v in net.state_dict().items()}
        base = f"{self.base.path} (sha256 {self.base.sha256})"
        meta = controlnet_meta(net.control_config, preprocess=self.cfg.control, base=base,
                               time_cond_proj_dim=net.time_cond_proj_dim)  # fmt: skip
        save_model_folder(self.out, meta.replace(training=self.provenance()), state)


def train_controlnet(
    cfg: ControlNetTrainConfig, resume: bool = False, resume_override: tuple[str, ...] = ()
) -> int:
    """Train the ControlNet `cfg` describes; 0, or 130 after saving on SIGTERM / SIGINT."""
    return run_training(ControlNetTrainer, cfg, resume, resume_override)
