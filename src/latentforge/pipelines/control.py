"""ControlNet guidance (Zhang, Rao and Agrawala 2023) for generate, img2img and inpaint.

A `Control` is a ControlNet with its control image, scale and active span. The pipelines
condition through `condition` here instead of `common.condition`: the model's network is
wrapped so that every call runs each active ControlNet on the same (x_in, t, text) as the
U-Net and adds the summed residuals (`add_residuals`, Multi-ControlNet) to its skips. The
control images travel in the cond dict (`control_image_k`, one key per ControlNet), so
classifier-free guidance batches them with both halves, as diffusers does.

- Size: each control image (1 or B, C, H, W) in [0, 1] is resized bilinearly (antialiased when
  shrinking, aspect ratio not kept) to the output size in pixels, which is the size the
  ControlNet's image encoder brings down to the latent grid.
- start / end: as diffusers defines them, per step i of the N steps run:
  keep = not (i / N < start or (i + 1) / N > end). Here that is a span of the sampled sigmas
  (from the first kept step's to the last kept step's), so a sampler's extra evaluations
  between kept steps are controlled too.
- guess mode: the ControlNet sees only the conditional half of guidance (its residuals
  weighted from 0.1 at the first skip to 1 at the mid block); the unconditional half gets no
  residuals (diffusers' behaviour).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from ..denoisers import make_denoiser
from ..errors import UserError
from ..guidance import CFGDenoiser, DenoiserWrapper
from ..io.lora import denoiser_network
from ..io.model_folder import LoadedModel, ModelFolder, wrap_consistency
from ..models.controlnet import ControlNet, ControlNetConfig, add_residuals
from .common import condition as plain_condition
from .common import on_device, with_image_cond
from .settings import SampleSettings

MAX_CONTROL_PIXELS = 64 * 2**20  # a larger control image is refused before it is resized
# the conditioning a ControlNet reads (the rest of cond is the U-Net's alone: concat, regions)
_CONTROLNET_KEYS = (
    "class_labels",
    "context",
    "context_mask",
    "extra_emb",
    "guidance",
    "text_embeds",
    "time_ids",
)


@dataclasses.dataclass(frozen=True)
class Control:
    """One ControlNet and how it steers: image (1 or B, C, H, W) in [0, 1] at any size (resized
    to the output), scale multiplies its residuals, [start, end] is the fraction of the steps
    it acts on, guess_mode as in diffusers (see the module docstring)."""

    net: ControlNet
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def check(self) -> None:
        """A one-line UserError for a value out of range."""
        for name in ("scale", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"control {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"control {name} must be finite, got {value!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise UserError(
                f"control start and end must satisfy 0 <= start < end <= 1, got "
                f"{self.start:g} and {self.end:g}"
            )


def control_images(
    image: torch.Tensor, n: int, size: tuple[int, int], channels: int
) -> torch.Tensor:
    """A control image -> (n, channels, H, W) at the output size `size` (the rule in the module
    docstring); a grey image feeds a colour ControlNet as three equal channels."""
    if not torch.is_tensor(image) or not image.is_floating_point():
        raise UserError("a control image must be a floating-point tensor in [0, 1]")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or min(image.shape) < 1:
        raise UserError(f"a control image must be (B, C, H, W), got {tuple(image.shape)}")
    b, c, h, w = image.shape
    if h * w > MAX_CONTROL_PIXELS:
        raise UserError(f"control image {w}x{h} is over the {MAX_CONTROL_PIXELS:,}-pixel limit")
    if b not in (1, n):
        raise UserError(f"got {b} control images for {n} outputs; give one, or one per output")
    if c != channels and not (c == 1 and channels == 3):
        raise UserError(f"the control image has {c} channels, the ControlNet reads {channels}")
    if not bool(torch.isfinite(image).all()):
        raise UserError("the control image has NaN or infinite values")
    image = image.float().clamp(0, 1).expand(n, channels, h, w)
    if (h, w) != tuple(size):
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                              antialias=size[0] < h or size[1] < w)  # fmt: skip
    return image.clamp(0, 1)


def active_span(sigmas: torch.Tensor, start: float, end: float) -> tuple[float, float]:
    """(lowest, highest) sigma at which a control acts, over the steps `sigmas` runs (its last
    level, the end, is no step); an empty span (lo > hi) when it keeps no step."""
    steps = len(sigmas) - 1
    kept = [float(sigmas[i]) for i in range(steps)
            if not (i / steps < start or (i + 1) / steps > end)]  # fmt: skip
    return (min(kept), max(kept)) if kept else (math.inf, -math.inf)


class ControlledNetwork(nn.Module):
    """The U-Net plus ControlNets: runs each ControlNet whose scale is nonzero for some rows on
    those rows (x, t and their text), and the U-Net with the summed residuals. cond carries
    `control_image_k` (B, C, H*f, W*f) and `control_scale` (B, K): 0 where a ControlNet is off
    (outside its span, or the unconditional half in guess mode)."""

    def __init__(self, network: nn.Module, nets: Sequence[ControlNet], guess: Sequence[bool]):
        super().__init__()
        self.network = network
        self.nets = nn.ModuleList(nets)
        self.guess = tuple(guess)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        images = [cond.pop(f"control_image_{k}") for k in range(len(self.nets))]
        scales = cond.pop("control_scale")  # (B, K)
        shared = {k: v for k, v in cond.items() if k in _CONTROLNET_KEYS and v is not None}
        parts = []
        for k, (net, image) in enumerate(zip(self.nets, images, strict=True)):
            rows = (scales[:, k] != 0).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            down, mid = net(
                x[rows], t[rows], image[rows], scale=scales[rows, k], guess_mode=self.guess[k],
                **{key: v[rows] for key, v in shared.items()},
            )  # fmt: skip
            if len(rows) < len(x):  # the rows it skipped get no residual
                down = [_scatter(r, rows, len(x)) for r in down]
                mid = _scatter(mid, rows, len(x))
            parts.append((down, mid))
        return self.network(x, t, control=add_residuals(parts), **cond)


def _scatter(r: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return r.new_zeros((n, *r.shape[1:])).index_copy(0, rows, r)


class ControlSpanDenoiser(DenoiserWrapper):
    """Zeroes each ControlNet's scale at the noise levels outside its active span."""

    def __init__(self, inner: nn.Module, spans: Sequence[tuple[float, float]]):
        super().__init__(inner)
        self.spans = list(spans)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).expand(x.shape[0])
        # relative tolerance: a sampler may hand back a level through float32
        on = [((s >= lo * (1 - 1e-6)) & (s <= hi * (1 + 1e-6))) for lo, hi in self.spans]
        scale = cond["control_scale"] * torch.stack(on, 1).to(cond["control_scale"].dtype)
        return self.inner(x, sigma, **{**cond, "control_scale": scale})


def controlled_model(
    model: LoadedModel, controls: Sequence[Control], sigmas: torch.Tensor
) -> LoadedModel:
    """`model` whose denoiser runs the ControlNets (and zeroes them outside their spans)."""
    network = denoiser_network(model)
    wrapped = ControlledNetwork(
        network, [c.net for c in controls], [c.guess_mode for c in controls]
    )
    denoiser = wrap_consistency(make_denoiser(wrapped, model.meta.parameterization), model.meta)
    spans = [active_span(sigmas, c.start, c.end) for c in controls]
    return dataclasses.replace(
        model, denoiser=ControlSpanDenoiser(denoiser.to(model.device), spans)
    )


def check_fit(model: ModelFolder, config: ControlNetConfig, what: str = "the ControlNet") -> None:
    """A ControlNet's config against a model: latent channels, the factor from the image to the
    latent grid, the text states it attends to; a one-line UserError naming the mismatch."""
    factor = model.output_shape[-1] // model.image_shape[-1]
    context = (model.meta.unet or {}).get("cross_attention_dim")
    if getattr(config.unet, "addition_time_embed_dim", 0):
        raise UserError(f"{what} has SDXL's added text-time embedding: SDXL ControlNets do not "
                        "run yet")  # fmt: skip
    if config.unet.in_channels != model.image_shape[0]:
        raise UserError(f"{what} reads {config.unet.in_channels}-channel inputs, the model "
                        f"samples {model.image_shape[0]} channels")  # fmt: skip
    if config.downscale != factor:
        raise UserError(f"{what} brings control images down {config.downscale}x, the model's "
                        f"latents are {factor}x smaller than its images")  # fmt: skip
    if config.unet.cross_attention_dim != context:
        raise UserError(f"{what} attends to {config.unet.cross_attention_dim}-wide text states, "
                        f"the model's U-Net to {context}")  # fmt: skip


def check_controls(model: ModelFolder, controls: Sequence[Control]) -> None:
    """Each `Control` checked (its values, and `check_fit` against the model)."""
    for i, c in enumerate(controls):
        if not isinstance(c, Control):
            raise UserError(f"controls[{i}] is not a Control")
        c.check()
        check_fit(model, c.net.control_config, f"ControlNet {i + 1}")


def condition(
    model: LoadedModel,
    n: int,
    settings: SampleSettings,
    controls: Sequence[Control],
    sigmas: torch.Tensor,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
) -> tuple[nn.Module, dict]:
    """`common.condition` (resolved settings, n images, the sigmas the sampler runs), with the
    ControlNets of `controls` wired in; exactly `common.condition` when there are none.

    A control image sets the layout, so the model's layout planner (regions read from the
    prompt) is off while ControlNets steer; regions given explicitly still apply. (On the
    embedded shapes model the planner's boxes fought the sketch: position 66% with them, 98%
    without, docs/controlnet.md.)"""
    if not controls:
        return plain_condition(model, n, settings, labels=labels, prompts=prompts)
    check_controls(model, controls)
    if not settings.regions:
        settings = settings.replace(layout="none")
    size = (settings.height, settings.width)
    extra = {}
    for k, c in enumerate(controls):
        image = control_images(c.image, n, size, c.net.control_config.conditioning_channels)
        extra[f"control_image_{k}"] = on_device(model, image)
    scales = torch.tensor([[float(c.scale) for c in controls]] * n, device=model.device)
    controlled = controlled_model(model, controls, sigmas)
    denoiser, cond = plain_condition(controlled, n, settings, labels=labels, prompts=prompts)
    denoiser, cond = with_image_cond(denoiser, cond, {**extra, "control_scale": scales})
    if isinstance(denoiser, CFGDenoiser):  # guess mode: no residuals for the unconditional half
        guess = torch.tensor([not c.guess_mode for c in controls], device=model.device)
        denoiser.uncond = {**denoiser.uncond, "control_scale": scales * guess.to(scales.dtype)}
    return denoiser, cond


# ----- from files and names: what the CLI and the server ask for -------------------------------
def open_control_image(source: str | Path | bytes, where: str = "control image") -> Image.Image:
    """A control image file (a path, or its bytes) -> an RGB PIL image. Unreadable data, or a
    size over MAX_CONTROL_PIXELS (checked from the header, before decoding), is one line."""
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise UserError(f"{where} not found: {source}")
    unreadable = (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except unreadable as e:
        raise UserError(f"{where}: not a readable image ({type(e).__name__})") from None
    with img:
        w, h = img.size
        if w * h > MAX_CONTROL_PIXELS:
            raise UserError(f"{where} is {w}x{h}, over the {MAX_CONTROL_PIXELS:,}-pixel limit")
        try:
            return img.convert("RGB")
        except unreadable as e:
            raise UserError(f"{where}: not a readable image ({type(e).__name__})") from None


def image_digest(image: Image.Image) -> str:
    """A short hash of an image's pixels (what PNG metadata records of a control image)."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:12]


def _per_control(values: Sequence, n: int, name: str, default: Any) -> list:
    """None / one value for every ControlNet / one value each."""
    values = list(values or ())
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"{len(values)} {name} values for {n} ControlNets; give one or {n}")
    return values


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """ControlNets named by folder and control images as given (any size, not preprocessed):
    what a command line or an HTTP request asks for. `build` loads and pairs them in order;
    with no ControlNet named, every image uses the model folder's default
    (`sampling.controlnet`). scales / starts / ends / preprocess / guess_mode: one value for
    all, or one per ControlNet; preprocess None (the default) is the one the ControlNet was
    trained with (its model.json's `preprocess`), "none" uses the image as it is."""

    images: tuple[Image.Image, ...]
    controlnets: tuple[str | Path, ...] = ()
    scales: tuple[float, ...] = ()
    starts: tuple[float, ...] = ()
    ends: tuple[float, ...] = ()
    preprocess: tuple[str | None, ...] = ()
    guess_mode: tuple[bool, ...] = ()

    def build(self, model: LoadedModel, option: str = "--controlnet") -> tuple[list, list]:
        """(the `Control`s, one record each for PNG metadata: ControlNet name and hash, control
        image hash, scale, start, end, preprocessor). `option` names the ControlNet field in
        errors."""
        from ..io.checkpoint import MODEL_WEIGHTS, file_digest
        from ..io.controlnet import default_controlnet, load_controlnet
        from ..preprocess import preprocess

        if not self.images:
            if self.controlnets:
                raise UserError(f"{option} needs a control image to go with it")
            return [], []
        folders = list(self.controlnets)
        if not folders:
            default = default_controlnet(model.path or ".", model.meta)
            if default is None:
                raise UserError(f"a control image needs {option}: this model names no default "
                                "ControlNet (model.json sampling.controlnet)")  # fmt: skip
            folders = [default] * len(self.images)
        n = len(folders)
        if len(self.images) != n:
            raise UserError(f"{len(self.images)} control images for {n} ControlNets ({option}); "
                            "they pair in order")  # fmt: skip
        scales = _per_control(self.scales, n, "scale", 1.0)
        starts = _per_control(self.starts, n, "start", 0.0)
        ends = _per_control(self.ends, n, "end", 1.0)
        kinds = _per_control(self.preprocess, n, "preprocess", None)
        guess = _per_control(self.guess_mode, n, "guess mode", False)
        loaded: dict[str, tuple] = {}
        controls, records = [], []
        for i, folder in enumerate(folders):
            key = str(folder)
            if key not in loaded:
                net, meta = load_controlnet(folder, device=model.device, dtype=_weights(model))
                loaded[key] = (net, meta, file_digest(Path(folder) / MODEL_WEIGHTS))
            net, meta, digest = loaded[key]
            kind = kinds[i] or meta.controlnet.get("preprocess", "none")
            picture = preprocess(self.images[i], kind)
            controls.append(Control(net, _to_tensor(picture), scale=scales[i], start=starts[i],
                                    end=ends[i], guess_mode=guess[i]))  # fmt: skip
            records.append({
                "controlnet": Path(folder).name, "sha256": digest,
                "image": image_digest(self.images[i]), "preprocess": kind,
                "scale": scales[i], "start": starts[i], "end": ends[i],
                "guess_mode": guess[i],
            })  # fmt: skip
        return controls, records


def _weights(model: LoadedModel) -> torch.dtype | None:
    """A ControlNet's weights in the model's dtype (None: fp32 as stored)."""
    from ..io.model_folder import DTYPES

    return None if model.dtype == "fp32" else DTYPES[model.dtype]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (1, 3, H, W) in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
