"""The model folder as one typed layer: `ModelMeta` (model.json), views and loaded models.

Every reader and writer of model.json goes through here. `ModelMeta.from_json` validates a
folder's description once, with one clear `UserError` per fault (a model.json of `[]`, a
missing section, a resolution that is not a number), and keeps keys it does not know, so a
folder written by a newer latentforge survives a round trip. `ModelFolder` is a weights-free
view (what the server lists and validates requests against); `LoadedModel` adds the
denoiser, and where used its VAE and text encoder.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..guidance import DenoiserWrapper
from .checkpoint import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    file_digest,
    load_tensors,
    read_json_file,
    save_tensors_atomic,
    write_json_atomic,
)

FORMAT = "latentforge"
DEVICE_ENV = "LATENTFORGE_DEVICE"
# --dtype names: weights (and, through the settings' precision, compute) of a loaded model
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KINDS = ("diffusion", "vae", "controlnet")
TASKS = ("generate", "superres", "inpaint")
DEFAULT_MODEL = "default"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """A device name -> torch.device. None or "auto" reads LATENTFORGE_DEVICE, else picks CUDA
    when available, then MPS, then the CPU; an unknown name or an absent accelerator is a
    one-line UserError."""
    name = str(name) if name is not None else ""
    if name in ("", "auto"):
        name = os.environ.get(DEVICE_ENV, "").strip() or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"device {name!r} asked for, but MPS is not available here")
    elif device.type != "cpu":
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_dtype(name: str, device: torch.device) -> torch.dtype:
    """A --dtype name -> torch dtype; fp16 only on a GPU (CPU kernels for it are slow or
    missing)."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise UserError("dtype fp16 needs a GPU (--device cuda or mps); use bf16 or fp32 on CPU")
    return DTYPES[name]


EMBEDDED_MODELS = (DEFAULT_MODEL, "fast", "upscaler")  # folders under assets/, by name


def assets_dir() -> Path:
    """The package's assets folder (the embedded models)."""
    return Path(str(resources.files("latentforge") / "assets"))


def default_model_dir() -> Path:
    """The embedded default model that ships inside the package."""
    return assets_dir() / DEFAULT_MODEL


def model_dir(path: str | Path | None) -> Path:
    """A --model value -> its folder: None is the embedded default model; the name of an
    embedded model (`EMBEDDED_MODELS`: default, fast, upscaler) is its folder in the package
    unless a folder of that name exists here; anything else is the path itself."""
    if path is None:
        return default_model_dir()
    path = Path(path)
    if str(path) in EMBEDDED_MODELS and not path.exists():
        return assets_dir() / str(path)
    return path


# ----- validation helpers ------------------------------------------------------------------------
# Limits a model.json is held to before anything is built: a folder past them is damaged or
# hostile (a resolution of 100000 would allocate tens of GB before the first step).
MAX_RESOLUTION = 4096  # pixels (or latents) on a side
MAX_CHANNELS = 256  # image, latent and concatenated channels
MAX_WIDTH = 8192  # a network level's channels, a context or refiner width
MAX_LEVELS = 8  # U-Net / VAE resolution levels
MAX_DEPTH = 64  # resnets per level, transformer depth, refiner layers, clip_skip
MAX_CLASSES = 1_000_000
MAX_STEPS = 10_000  # default sampling steps
MAX_TIMESTEPS = 100_000  # a discrete schedule's training timesteps
MAX_TOKENS = 512  # a text encoder's max_length (MiniLM's position table)
MAX_GUIDANCE = 100.0
MAX_ACTIVATION = 2**31  # numbers in the U-Net's first feature map for one image (8 GiB fp32)


def _section(d: Mapping, key: str, where: str, *, required: bool = False) -> dict | None:
    value = d.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: model.json has no {key!r} section")
        return None
    if not isinstance(value, dict):
        raise UserError(f"{where}: model.json {key!r} must be an object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), repr(value)
    )


def _int(
    d: Mapping, key: str, where: str, default: int | None = None, minimum: int = 0,
    maximum: int | None = None,
) -> Any:  # fmt: skip
    value = d.get(key, default)
    if value is None and default is None and key not in d:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        span = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UserError(f"{where}: {key} must be an integer {span}, got {value!r}")
    return value


def _number(
    d: Mapping, key: str, where: str, default: float | None = None, *,
    minimum: float | None = None, maximum: float | None = None, positive: bool = False,
) -> Any:  # fmt: skip
    """A finite number (None where absent and no default), optionally ranged."""
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
    if (
        (positive and value <= 0)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        lo = "> 0" if positive else f">= {minimum:g}" if minimum is not None else ""
        hi = f"<= {maximum:g}" if maximum is not None else ""
        raise UserError(f"{where}: {key} must be {' and '.join(s for s in (lo, hi) if s)}, "
                        f"got {value!r}")  # fmt: skip
    return value


def _bool(d: Mapping, key: str, where: str) -> None:
    if key in d and d[key] is not None and not isinstance(d[key], bool):
        raise UserError(f"{where}: {key} must be true or false, got {d[key]!r}")


def _ints(d: Mapping, key: str, where: str, maximum: int) -> tuple[int, ...]:
    """A non-empty list of at most MAX_LEVELS integers in [1, maximum]."""
    value = d.get(key)
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LEVELS:
        raise UserError(f"{where}: {key} must be a list of 1 to {MAX_LEVELS} integers, got "
                        f"{value!r}")  # fmt: skip
    for v in value:
        _int({key: v}, key, where, minimum=1, maximum=maximum)
    return tuple(value)


def _str(d: Mapping, key: str, where: str, default: str | None = None) -> Any:
    value = d.get(key, default)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _subfolder(d: Mapping, key: str, where: str, default: str) -> str:
    value = _str(d, key, where, default)
    if not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise UserError(f"{where}.{key} must be a sub-folder name, got {value!r}")
    return value


def _vae_reference(d: Mapping, where: str) -> str:
    """latent.vae: a sub-folder, or "../NAME/vae", the VAE of embedded model NAME, which only an
    embedded model may name (`read_model_meta` checks): `fast` shares the default's VAE."""
    value = _str(d, "vae", where, "vae")
    parts = Path(value or "").parts
    if len(parts) == 3 and parts[0] == ".." and parts[1] in EMBEDDED_MODELS and parts[2] == "vae":
        return value
    return _subfolder(d, "vae", where, "vae")


def _extra(d: Mapping, known: tuple[str, ...]) -> dict:
    return {k: copy.deepcopy(v) for k, v in d.items() if k not in known}


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


# ----- network configs and the other free-form sections ------------------------------------------
def _check_groups(chans: tuple[int, ...], groups: Any, where: str) -> None:
    _int({"norm_groups": groups}, "norm_groups", where, minimum=1, maximum=MAX_WIDTH)
    if any(ch % groups for ch in chans):
        raise UserError(f"{where}: block_out_channels {list(chans)} are not all multiples of "
                        f"norm_groups {groups}")  # fmt: skip


def check_unet_config(config: Any, where: str) -> None:
    """Every field of a `UNetConfig` typed, in range and consistent with the others, so that
    building the network cannot fail or grow past the limits afterwards."""
    d, w = dataclasses.asdict(config), f"{where}: unet"
    for key in ("in_channels", "out_channels"):
        _int(d, key, w, minimum=1, maximum=MAX_CHANNELS)
    chans = _ints(d, "block_out_channels", w, MAX_WIDTH)
    levels = d["attention_levels"]
    if (
        not isinstance(levels, (list, tuple))
        or len(levels) != len(chans)
        or not all(isinstance(a, bool) for a in levels)
    ):
        raise UserError(f"{w}: attention_levels must be {len(chans)} true/false flags (one per "
                        f"block_out_channels entry), got {levels!r}")  # fmt: skip
    _int(d, "layers_per_block", w, minimum=1, maximum=MAX_DEPTH)
    depth = d["transformer_depth"]
    if isinstance(depth, (list, tuple)):  # per level (SDXL)
        if len(depth) != len(chans):
            raise UserError(f"{w}: transformer_depth must be one integer or one per level, got "
                            f"{list(depth)!r}")  # fmt: skip
        for v in depth:
            _int({"transformer_depth": v}, "transformer_depth", w, minimum=1, maximum=MAX_DEPTH)
    else:
        _int(d, "transformer_depth", w, minimum=1, maximum=MAX_DEPTH)
    if _int(d, "addition_time_embed_dim", w, maximum=MAX_WIDTH):  # SDXL's added embedding
        if d["addition_time_embed_dim"] % 2:
            raise UserError(f"{w}: addition_time_embed_dim must be even")
        _int(d, "projection_class_embeddings_input_dim", w, minimum=1, maximum=MAX_WIDTH)
    if d["cross_attention_dim"] is not None:
        _int(d, "cross_attention_dim", w, minimum=1, maximum=MAX_WIDTH)
    _int(d, "num_classes", w, maximum=MAX_CLASSES)
    for key in ("linear_projection", "mid_attention", "flip_sin_to_cos"):
        _bool(d, key, w)
    _check_groups(chans, d["norm_groups"], w)
    _number(d, "dropout", w, minimum=0.0, maximum=0.99)
    if chans[0] % 2:
        raise UserError(f"{w}: block_out_channels[0] must be even (the timestep embedding)")
    _number(d, "freq_shift", w, minimum=0.0, maximum=chans[0] // 2 - 1)
    heads = d["num_heads"]
    per_level = heads if isinstance(heads, (list, tuple)) else [heads] * len(chans)
    if len(per_level) != len(chans):
        raise UserError(f"{w}: num_heads must be one integer or one per level, got {heads!r}")
    attended = [i for i, a in enumerate(levels) if a] + (
        [len(chans) - 1] if d["mid_attention"] else []
    )
    for i in attended:
        n = _int({"num_heads": per_level[i]}, "num_heads", w, minimum=1, maximum=MAX_WIDTH)
        if chans[i] % n:
            raise UserError(f"{w}: {chans[i]} channels at level {i} do not split into {n} heads")
    _int(d, "position_embedding", w, maximum=MAX_RESOLUTION)
    if _int(d, "context_refiner", w, maximum=MAX_DEPTH):
        if d["cross_attention_dim"] is None:
            raise UserError(f"{w}: context_refiner needs cross_attention_dim (a text model)")
        width = _int(d, "context_refiner_width", w, minimum=4, maximum=MAX_WIDTH)
        if width % 8:  # 4 heads, and an even sinusoidal position embedding per head
            raise UserError(f"{w}: context_refiner_width must be a multiple of 8, got {width}")


def check_vae_config(config: Any, where: str) -> None:
    """A `VAEConfig`'s fields typed, in range and consistent (see `check_unet_config`)."""
    d, w = dataclasses.asdict(config), f"{where}: vae"
    for key in ("in_channels", "out_channels", "latent_channels"):
        _int(d, key, w, minimum=1, maximum=MAX_CHANNELS)
    chans = _ints(d, "block_out_channels", w, MAX_WIDTH)
    _int(d, "layers_per_block", w, minimum=1, maximum=MAX_DEPTH)
    _check_groups(chans, d["norm_groups"], w)
    _bool(d, "mid_attention", w)
    _number(d, "scaling_factor", w, positive=True)


def _config(cls: Any, d: Any, name: str, check: Any, where: str = "model.json") -> Any:
    try:
        config = cls.from_dict(d)
    except UserError as e:
        raise UserError(f"{where}: {name}: {e}") from None
    check(config, where)
    return config


def _check_parameterization(p: Mapping, where: str) -> None:
    from ..denoisers import PREDICTIONS
    from ..schedules import BETA_SCHEDULES

    w = f"{where}: parameterization"
    kind = _str(p, "type", w, "vp")
    _number(p, "clip_denoised", w, positive=True)
    if kind == "edm":
        if "consistency" in p:
            raise UserError(f"{w}.consistency needs a vp parameterization (discrete timesteps)")
        for key in ("sigma_data", "sigma_min", "sigma_max", "p_std"):
            _number(p, key, w, positive=True)
        _number(p, "p_mean", w)
        if p.get("sigma_min", 0.002) >= p.get("sigma_max", 80.0):
            raise UserError(f"{w}: sigma_min must be below sigma_max")
        return
    if kind != "vp":
        raise UserError(f"{w}.type {kind!r} is not one of vp, edm")
    consistency = _section(p, "consistency", w)
    if consistency is not None:
        unknown = set(consistency) - {"sigma_data", "timestep_scaling"}
        if unknown:
            raise UserError(f"{w}.consistency: unknown keys {sorted(unknown)}")
        _number(consistency, "sigma_data", f"{w}.consistency", positive=True)
        _number(consistency, "timestep_scaling", f"{w}.consistency", positive=True)
    for key, allowed in (("prediction", PREDICTIONS), ("beta_schedule", BETA_SCHEDULES)):
        if key in p and p[key] not in allowed:
            raise UserError(f"{w}.{key} {p[key]!r} is not one of {', '.join(allowed)}")
    _int(p, "num_timesteps", w, minimum=2, maximum=MAX_TIMESTEPS)
    start = _number(p, "beta_start", w, positive=True, maximum=0.999)
    end = _number(p, "beta_end", w, positive=True, maximum=0.999)
    if start is not None and end is not None and start > end:
        raise UserError(f"{w}: beta_start {start} is above beta_end {end}")
    _bool(p, "zero_terminal_snr", w)
    _number(p, "min_snr_gamma", w, positive=True)


def _check_text_encoder(t: Mapping, where: str) -> None:
    w = f"{where}: text_encoder"
    if t.get("type") == "minilm":
        _int(t, "max_length", w, minimum=1, maximum=MAX_TOKENS)
        _int(t, "phrases", w, maximum=MAX_DEPTH)
        _bool(t, "phrase_only", w)
    elif t.get("type") == "clip":
        _subfolder(t, "path", w, "text_encoder")
        _subfolder(t, "tokenizer", w, "tokenizer")
        _int(t, "clip_skip", w, minimum=1, maximum=MAX_DEPTH)
        _bool(t, "use_mask", w)
    elif t.get("type") == "sdxl":  # CLIP-L (path; none in the refiner) + OpenCLIP bigG (path_2)
        if t.get("path") is not None:
            _subfolder(t, "path", w, "text_encoder")
            _subfolder(t, "tokenizer", w, "tokenizer")
        _subfolder(t, "path_2", w, "text_encoder_2")
        _subfolder(t, "tokenizer_2", w, "tokenizer_2")
        _bool(t, "force_zeros_for_empty_prompt", w)
        _bool(t, "requires_aesthetics_score", w)
    else:
        raise UserError(f"{w}.type {t.get('type')!r} is not one of minilm, clip, sdxl")


def text_encoder_dirs(text: Mapping) -> list[str]:
    """The sub-folders holding a text_encoder block's transformers weights (CLIP, SDXL)."""
    if text.get("type") == "clip":
        return [text.get("path", "text_encoder")]
    if text.get("type") == "sdxl":
        return [p for p in (text.get("path"), text.get("path_2", "text_encoder_2")) if p]
    return []


def _check_guidance_embedding(g: Mapping, where: str) -> None:
    w = f"{where}: guidance_embedding"
    unknown = set(g) - {"time_cond_proj_dim", "guidance"}
    if unknown:
        raise UserError(f"{w}: unknown keys {sorted(unknown)}")
    dim = _int(g, "time_cond_proj_dim", w, minimum=2, maximum=MAX_WIDTH)
    if dim is None or dim % 2:
        raise UserError(f"{w}: time_cond_proj_dim must be an even integer, got {dim!r}")
    _number(g, "guidance", w, 1.0, minimum=0.0, maximum=MAX_GUIDANCE)


# ----- sections ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataInfo:
    """What the network was trained on: the data spec and the tensor shape it works on (latents
    for a latent model)."""

    resolution: int
    channels: int
    spec: str | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict, compare=True)

    _KEYS = ("spec", "resolution", "channels", "num_classes", "class_names")

    @classmethod
    def from_json(cls, d: Mapping, where: str) -> DataInfo:
        names = d.get("class_names")
        if names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            raise UserError(f"{where}: data.class_names must be a list of strings")
        w = f"{where}: data"
        return cls(
            resolution=_int(d, "resolution", w, minimum=1, maximum=MAX_RESOLUTION),
            channels=_int(d, "channels", w, minimum=1, maximum=MAX_CHANNELS),
            spec=_str(d, "spec", where),
            num_classes=_int(d, "num_classes", w, maximum=MAX_CLASSES)
            if "num_classes" in d
            else None,
            class_names=None if names is None else tuple(names),
            extra=_extra(d, cls._KEYS),
        )

    def to_json(self) -> dict:
        names = None if self.class_names is None else list(self.class_names)
        out = {"spec": self.spec, "resolution": self.resolution, "channels": self.channels,
               "num_classes": self.num_classes, "class_names": names}  # fmt: skip
        return {**_drop_none(out), **copy.deepcopy(self.extra)}


@dataclass(frozen=True)
class SamplingDefaults:
    """The settings a model folder recommends: what generate uses where the user sets none."""

    sampler: str = "ddim"
    steps: int = 20
    spacing: str | None = None
    guidance: float = 1.0
    guidance_interval: tuple | None = None  # (lo, hi), None for an open end (model.json: null)
    layout: str | None = None
    noise_level: float | None = None  # super-resolution models: the low-res image's noise
    controlnet: str | None = None  # the sub-folder of the ControlNet `--control` uses alone
    extra: dict = field(default_factory=dict)

    _KEYS = ("sampler", "steps", "spacing", "guidance", "guidance_interval", "layout",
             "noise_level", "controlnet")  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping, where: str) -> SamplingDefaults:
        from ..guidance import parse_interval

        w = f"{where}: sampling"
        interval = d.get("guidance_interval")
        if interval is not None:
            if not (isinstance(interval, list) and len(interval) == 2):
                raise UserError(f"{w}.guidance_interval must be [lo, hi], got {interval!r}")
            try:
                parse_interval(interval)
            except UserError as e:
                raise UserError(f"{w}.guidance_interval: {e}") from None
        return cls(
            sampler=_str(d, "sampler", w, "ddim"),
            steps=_int(d, "steps", w, 20, minimum=1, maximum=MAX_STEPS),
            spacing=_str(d, "spacing", w),
            guidance=_number(d, "guidance", w, 1.0, minimum=0.0, maximum=MAX_GUIDANCE),
            guidance_interval=None if interval is None else tuple(interval),
            layout=_str(d, "layout", w),
            controlnet=_subfolder(d, "controlnet", w, "") if "controlnet" in d else None,
            noise_level=_number(d, "noise_level", w, minimum=0.0, maximum=1.0),
            extra=_extra(d, cls._KEYS),
        )

    def to_json(self) -> dict:
        interval = None if self.guidance_interval is None else list(self.guidance_interval)
        out = {"sampler": self.sampler, "steps": self.steps, "spacing": self.spacing,
               "guidance": self.guidance, "guidance_interval": interval, "layout": self.layout,
               "noise_level": self.noise_level, "controlnet": self.controlnet}  # fmt: skip
        return {**_drop_none(out), **copy.deepcopy(self.extra)}


@dataclass(frozen=True)
class LatentInfo:
    """A latent model's VAE (a sub-folder) and the images it decodes to."""

    image_resolution: int
    scaling_factor: float = 1.0
    vae: str = "vae"
    image_channels: int = 3
    extra: dict = field(default_factory=dict)

    _KEYS = ("vae", "scaling_factor", "image_resolution", "image_channels")

    @classmethod
    def from_json(cls, d: Mapping, where: str) -> LatentInfo:
        w = f"{where}: latent"
        return cls(
            image_resolution=_int(d, "image_resolution", w, minimum=1, maximum=MAX_RESOLUTION),
            scaling_factor=_number(d, "scaling_factor", w, 1.0, positive=True),
            vae=_vae_reference(d, w),
            image_channels=_int(d, "image_channels", w, 3, minimum=1, maximum=MAX_CHANNELS),
            extra=_extra(d, cls._KEYS),
        )

    def to_json(self) -> dict:
        return {"vae": self.vae, "scaling_factor": self.scaling_factor,
                "image_resolution": self.image_resolution, "image_channels": self.image_channels,
                **copy.deepcopy(self.extra)}  # fmt: skip


def _check_depth(d: Any, where: str, limit: int = 64) -> None:
    """Nesting past `limit` levels (no model.json needs 10) would overflow the recursion of the
    deep copies below: refused, iteratively."""
    stack = [(d, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise UserError(f"{where}: model.json is nested more than {limit} levels deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


PREPROCESS_NAME = 64  # longest preprocessor name a ControlNet folder may record


def _check_controlnet(c: Mapping, where: str) -> None:
    """A ControlNet folder's `controlnet` section: `ControlNetConfig.to_dict()` plus `base` (the
    model it was made for, free text) and `preprocess` (its control images' preprocessor)."""
    from ..models.controlnet import ControlNetConfig

    w = f"{where}: controlnet"
    config = {k: v for k, v in c.items() if k not in ("base", "preprocess")}
    _int(config, "conditioning_channels", w, 3, minimum=1, maximum=MAX_CHANNELS)
    if "embedding_channels" in config:
        _ints(config, "embedding_channels", w, MAX_WIDTH)
    _bool(config, "global_pool", w)
    _str(c, "base", w)
    name = _str(c, "preprocess", w, "none")
    if not name or len(name) > PREPROCESS_NAME or not name.replace("-", "_").isidentifier():
        raise UserError(f"{w}.preprocess must be a preprocessor name, got {name!r}")
    _config(ControlNetConfig, config, "controlnet", lambda cfg, _: check_unet_config(cfg.unet, w),
            where)  # fmt: skip


def _check_networks(meta: ModelMeta, where: str) -> None:
    """The network config against the data it runs on: channels in and out, a resolution the
    U-Net can halve, a latent size the VAE's power-of-two factor reaches, a text encoder for
    cross-attention, a preview map per latent channel."""
    from ..models.presets import UNetConfig
    from ..models.vae import VAEConfig

    data = meta.data
    if meta.kind == "controlnet":
        _check_controlnet(meta.controlnet, where)
        return
    if meta.kind == "vae":
        config = _config(VAEConfig, meta.vae, "vae", check_vae_config, where)
        if data.resolution % config.downsample_factor:
            raise UserError(f"{where}: data.resolution {data.resolution} is not a multiple of the "
                            f"VAE's downsampling factor {config.downsample_factor}")  # fmt: skip
        rows = meta.latent_rgb
        width = config.latent_channels + 1
        if rows is not None and not (
            len(rows) == 3
            and all(isinstance(r, list) and len(r) == width for r in rows)
            and all(_number({"v": v}, "v", where) is not None for r in rows for v in r)
        ):
            raise UserError(f"{where}: latent_rgb must be 3 rows of {width} numbers")
        return
    config = _config(UNetConfig, meta.unet, "unet", check_unet_config, where)
    if meta.guidance_embedding and meta.task != "generate":
        raise UserError(f"{where}: a guidance_embedding needs task generate, not {meta.task!r}")
    concat = (meta.concat_channels or 0) if meta.task != "generate" else 0
    if config.out_channels != data.channels or config.in_channels != data.channels + concat:
        extra = f" + {concat} concatenated" if concat else ""
        raise UserError(
            f"{where}: the U-Net takes {config.in_channels} channels and gives "
            f"{config.out_channels}, but data.channels is {data.channels}{extra}"
        )
    m = 2 ** (len(config.block_out_channels) - 1)
    if data.resolution % m:
        raise UserError(f"{where}: data.resolution {data.resolution} is not a multiple of {m}, "
                        "the U-Net's downsampling factor")  # fmt: skip
    numbers = config.block_out_channels[0] * data.resolution**2
    if numbers > MAX_ACTIVATION:  # the guard on activations; the weights' is their header
        raise UserError(
            f"{where}: {config.block_out_channels[0]} channels at {data.resolution}x"
            f"{data.resolution} are {numbers * 4 / 2**30:.0f} GiB per image in the U-Net's "
            f"first level, over the {MAX_ACTIVATION * 4 / 2**30:.0f} GiB limit"
        )
    if meta.text_encoder and config.cross_attention_dim is None:
        raise UserError(f"{where}: a text encoder, but the U-Net has no cross_attention_dim")
    if meta.latent is not None:
        f, rem = divmod(meta.latent.image_resolution, data.resolution)
        if rem or f & (f - 1):
            raise UserError(
                f"{where}: latent.image_resolution {meta.latent.image_resolution} is not "
                f"data.resolution {data.resolution} times a power of two (the VAE's factor)"
            )


# ----- model.json --------------------------------------------------------------------------------
_TOP_KEYS = (
    "format", "version", "kind", "cond", "task", "unet", "vae", "parameterization", "data",
    "sampling", "latent", "text_encoder", "scale", "concat_channels", "scaling_factor",
    "latent_rgb", "source", "init_from", "eval", "training", "guidance_embedding", "controlnet",
)  # fmt: skip


@dataclass(frozen=True)
class ModelMeta:
    """A model folder's model.json, typed and validated.

    `unet`, `vae`, `parameterization`, `text_encoder` stay plain dicts (their own configs parse
    them: `UNetConfig.from_dict`, `VAEConfig.from_dict`, `make_denoiser`, `build_text_encoder`);
    provenance (`source`, `init_from`, `eval`, `training`) is free-form. Keys this version does
    not know are kept in `extra` and written back. Treat every dict here as read-only: build a
    changed meta with `replace` / `with_section`.
    """

    kind: str
    data: DataInfo | None  # None only for a ControlNet folder (it runs at any size)
    unet: dict | None = None
    vae: dict | None = None
    parameterization: dict | None = None
    cond: str | None = None
    task: str = "generate"
    sampling: SamplingDefaults | None = None
    latent: LatentInfo | None = None
    text_encoder: dict | None = None
    scale: int | None = None
    concat_channels: int | None = None
    scaling_factor: float | None = None  # VAE folders: latents are multiplied by it
    latent_rgb: list | None = None  # VAE folders: the fitted latent -> RGB preview map
    # {"time_cond_proj_dim": N, "guidance": G}: the U-Net embeds the guidance scale (diffusers'
    # time_cond_proj_dim; LCM and distilled models), run at G where a call gives none
    guidance_embedding: dict | None = None
    # ControlNet folders: ControlNetConfig.to_dict() + base (what it was made for) + preprocess
    controlnet: dict | None = None
    source: dict | None = None
    init_from: dict | None = None
    eval: dict | None = None
    training: dict | None = None
    format: str = FORMAT
    version: int = 1
    extra: dict = field(default_factory=dict)

    # ----- JSON --------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, d: Any, where: str = "model.json") -> ModelMeta:
        """Validate a parsed model.json as a whole (every section typed and ranged, the sections
        against each other); UserError naming the first fault. Runs before any tensor exists."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: model.json must be an object, got {_kind(d)}")
        _check_depth(d, where)
        kind = d.get("kind")
        if kind not in KINDS:
            raise UserError(f"{where}: model kind {kind!r} is not one of {', '.join(KINDS)}")
        task = _str(d, "task", where, "generate")
        if task not in TASKS:
            raise UserError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
        diffusion = kind == "diffusion"
        unet = _section(d, "unet", where, required=diffusion)
        param = _section(d, "parameterization", where, required=diffusion)
        if param is not None:
            if not isinstance(param.get("type"), str):
                raise UserError(f"{where}: parameterization.type must be a string")
            _check_parameterization(param, where)
        vae = _section(d, "vae", where, required=kind == "vae")
        data = _section(d, "data", where, required=kind != "controlnet")
        control = _section(d, "controlnet", where, required=kind == "controlnet")
        sampling = _section(d, "sampling", where)
        latent = _section(d, "latent", where)
        text = _section(d, "text_encoder", where)
        if text is not None:
            if not isinstance(text.get("type"), str):
                raise UserError(f"{where}: text_encoder.type must be a string")
            _check_text_encoder(text, where)
        if task != "generate" and diffusion:
            _int(d, "concat_channels", where, minimum=1, maximum=MAX_CHANNELS)
        embedding = _section(d, "guidance_embedding", where)
        if embedding is not None:
            _check_guidance_embedding(embedding, where)
        rgb = d.get("latent_rgb")
        if rgb is not None and not isinstance(rgb, list):
            raise UserError(f"{where}: latent_rgb must be a list")
        meta = cls(
            kind=kind,
            data=None if data is None else DataInfo.from_json(data, where),
            unet=copy.deepcopy(unet),
            vae=copy.deepcopy(vae),
            parameterization=copy.deepcopy(param),
            cond=_str(d, "cond", where),
            task=task,
            sampling=None if sampling is None else SamplingDefaults.from_json(sampling, where),
            latent=None if latent is None else LatentInfo.from_json(latent, where),
            text_encoder=copy.deepcopy(text),
            scale=_int(d, "scale", where, minimum=1, maximum=64) if "scale" in d else None,
            concat_channels=_int(d, "concat_channels", where, maximum=MAX_CHANNELS)
            if "concat_channels" in d
            else None,
            scaling_factor=_number(d, "scaling_factor", where, positive=True),
            latent_rgb=copy.deepcopy(rgb),
            guidance_embedding=copy.deepcopy(embedding),
            controlnet=copy.deepcopy(control),
            source=copy.deepcopy(_section(d, "source", where)),
            init_from=copy.deepcopy(_section(d, "init_from", where)),
            eval=copy.deepcopy(_section(d, "eval", where)),
            training=copy.deepcopy(_section(d, "training", where)),
            format=_str(d, "format", where, FORMAT),
            version=_int(d, "version", where, 1),
            extra=_extra(d, _TOP_KEYS),
        )
        _check_networks(meta, where)
        return meta

    def to_json(self) -> dict:
        """The model.json dict (sections in the order the writers have always used)."""
        out = {
            "format": self.format, "version": self.version, "kind": self.kind, "cond": self.cond,
            "task": None if self.task == "generate" else self.task,
            "unet": self.unet, "vae": self.vae, "parameterization": self.parameterization,
            "data": None if self.data is None else self.data.to_json(),
            "sampling": None if self.sampling is None else self.sampling.to_json(),
            "latent": None if self.latent is None else self.latent.to_json(),
            "text_encoder": self.text_encoder, "scale": self.scale,
            "concat_channels": self.concat_channels, "scaling_factor": self.scaling_factor,
            "latent_rgb": self.latent_rgb, "guidance_embedding": self.guidance_embedding,
            "controlnet": self.controlnet, "source": self.source, "init_from": self.init_from,
            "eval": self.eval, "training": self.training,
        }  # fmt: skip
        return copy.deepcopy({**_drop_none(out), **self.extra})

    def replace(self, **changes: Any) -> ModelMeta:
        return dataclasses.replace(self, **changes)

    def with_defaults(self, **changes: Any) -> ModelMeta:
        """A copy whose sampling defaults have `changes` (e.g. layout="shapes")."""
        return self.replace(sampling=dataclasses.replace(self.defaults, **changes))

    # ----- what the description says -----------------------------------------------------------
    @property
    def defaults(self) -> SamplingDefaults:
        """The folder's sampling defaults (the built-in ones where it names none)."""
        return self.sampling or SamplingDefaults()

    @property
    def num_classes(self) -> int:
        return int((self.unet or {}).get("num_classes") or 0)

    @property
    def class_names(self) -> list[str]:
        return list(self.data.class_names or ())

    @property
    def conditioning(self) -> str:
        """What a prompt conditions: "text", "class" or "none"."""
        if self.text_encoder:
            return "text"
        return "class" if self.num_classes else "none"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of what the denoiser works on (pixels, or latents for a latent model)."""
        return self.data.channels, self.data.resolution, self.data.resolution

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of the decoded images."""
        if self.latent is None:
            return self.image_shape
        res = self.latent.image_resolution
        return self.latent.image_channels, res, res


def read_model_meta(folder: str | Path) -> ModelMeta:
    """A folder's model.json, parsed and validated; UserError naming the fault."""
    folder = Path(folder)
    meta = ModelMeta.from_json(read_json_file(folder), str(folder))
    shared = meta.latent is not None and meta.latent.vae.startswith("..")
    if shared and folder.resolve().parent != assets_dir().resolve():
        raise UserError(f"{folder}: latent.vae {meta.latent.vae!r} is outside the folder; only "
                        "the embedded models share a VAE")  # fmt: skip
    return meta


def save_model_folder(
    folder: str | Path, meta: ModelMeta, state_dict: Mapping[str, torch.Tensor]
) -> None:
    """model.json + model.safetensors; weights first so model.json never points at nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(folder / MODEL_WEIGHTS, dict(state_dict), {"format": FORMAT})
    write_json_atomic(folder / MODEL_JSON, meta.to_json())


def load_model_folder(folder: str | Path) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
    meta = read_model_meta(folder)
    return meta, load_tensors(Path(folder) / MODEL_WEIGHTS)


# ----- views and loaded models -------------------------------------------------------------------
@dataclass
class ModelFolder:
    """A diffusion model folder's description without its weights: what it conditions on, its
    shapes, its defaults. The server validates requests against it before loading anything."""

    meta: ModelMeta
    path: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):  # a hand-built description (tests, benchmarks)
            self.meta = ModelMeta.from_json(self.meta)
        if self.meta.kind != "diffusion":
            raise UserError(f"{self.path}: model kind {self.meta.kind!r} is not a diffusion model")

    @classmethod
    def read(cls, folder: str | Path) -> ModelFolder:
        """The folder's view; an embedded model's name (see `model_dir`) reads its folder."""
        folder = model_dir(folder)
        return cls(read_model_meta(folder), folder)

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def conditioning(self) -> str:
        """What a prompt conditions: "text", "class" or "none" (from model.json alone)."""
        return self.meta.conditioning

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.meta.image_shape

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self.meta.output_shape

    @property
    def scaling_factor(self) -> float:
        return self.meta.latent.scaling_factor if self.meta.latent else 1.0

    @property
    def defaults(self) -> SamplingDefaults:
        return self.meta.defaults


@dataclass
class LoadedModel(ModelFolder):
    """A diffusion model folder in memory: denoiser, and where used its VAE and text encoder."""

    denoiser: nn.Module | None = None
    sha256: str = ""
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    dtype: str = "fp32"  # the weights' (`DTYPES`); the VAE stays fp32 under fp16

    @property
    def device(self) -> torch.device:
        """Where the denoiser's weights are (the CPU for a network-less stand-in)."""
        p = next(iter(self.denoiser.parameters()), None) if self.denoiser is not None else None
        return torch.device("cpu") if p is None else p.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the denoiser's space: scaled VAE latents (posterior mode), or the
        images themselves for a pixel-space model."""
        if self.vae is None:
            return images
        return self.vae.encode(images).mode() * self.scaling_factor

    @torch.no_grad()
    def preview(self, x: torch.Tensor) -> torch.Tensor:
        """A cheap image of x for live display: the VAE's fitted linear latent->RGB map when it
        has one (no decoder pass), else the full decode."""
        rgb_map = getattr(self.vae, "latent_rgb", None)
        if rgb_map is None:
            return self.decode(x)
        from ..models.vae import latent_to_rgb_preview

        return latent_to_rgb_preview(x / self.scaling_factor, rgb_map)

    @torch.no_grad()
    def decode(
        self, x: torch.Tensor, tile_size: int | None = None, slice_batch: bool = False
    ) -> torch.Tensor:
        """The denoiser's space -> images in [-1, 1]; `tile_size` (latent pixels) and
        `slice_batch` (one image at a time) bound memory."""
        if self.vae is None:
            return x
        z = x / self.scaling_factor
        return self.vae.decode(z, tile_size=tile_size, slice_batch=slice_batch).clamp(-1, 1)


def build_denoiser(
    meta: ModelMeta,
    state: Mapping[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The denoiser a model.json describes; `state` (tensors or lazy tensors) is loaded strictly,
    tensor by tensor into a network built on the meta device and placed on `device`, so an
    SD-size U-Net never exists twice in memory (nor once on the CPU when it goes to a GPU).
    dtype=torch.bfloat16 gives bf16 weights."""
    from ..denoisers import make_denoiser
    from ..models.presets import UNetConfig
    from ..models.unet import UNet
    from .lazy import build_module

    config = UNetConfig.from_dict(meta.unet)

    def network() -> nn.Module:
        if meta.task in ("superres", "inpaint"):  # the conditioning image is concatenated
            from ..models.conditioned import ConcatUNet

            return ConcatUNet(config, meta.concat_channels, noise_level=meta.task == "superres")
        return UNet(config, **unet_guidance(meta))

    if state is None:
        unet = network()
    else:
        unet = build_module(network, state, "U-Net", dtype=dtype, device=device)
    unet.eval().requires_grad_(False)
    return wrap_consistency(make_denoiser(unet, meta.parameterization), meta).to(device)


def wrap_consistency(denoiser: nn.Module, meta: ModelMeta) -> nn.Module:
    """`denoiser` as the consistency model model.json describes, or as it is."""
    spec = (meta.parameterization or {}).get("consistency")
    return denoiser if spec is None else ConsistencyDenoiser(denoiser, **spec)


class ConsistencyDenoiser(DenoiserWrapper):
    """A consistency model's parameterization around a VP denoiser (LCM, Luo et al. 2023, eq. 9;
    diffusers' `LCMScheduler`): f(x, t) = c_skip(t) x_t + c_out(t) x0_hat(x, t), with x_t the VP
    sample and t the discrete timestep of sigma, so f(x, sigma_min) = x_t exactly (the boundary
    condition). model.json: parameterization.consistency = {sigma_data, timestep_scaling}."""

    def __init__(self, inner: nn.Module, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__(inner)
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at these sigmas: c_skip = 1, c_out = 0 at timestep 0."""
        scaled = self.inner.sigma_to_t(sigma.double()) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        return c_skip, scaled / (scaled**2 + self.sigma_data**2).sqrt()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        c_skip, c_out = self.scalings(sigma)
        c_in = (1 + sigma.double() ** 2).rsqrt()  # x_t = x / sqrt(1 + sigma^2)
        shape = (-1,) + (1,) * (x.ndim - 1)  # (B, 1, 1, 1)
        x0 = self.inner(x, sigma, **cond)
        return (c_skip * c_in).view(shape).to(x.dtype) * x + c_out.view(shape).to(x.dtype) * x0


def unet_guidance(meta: ModelMeta) -> dict:
    """The `UNet` keywords of a model folder's guidance embedding (none without one)."""
    g = meta.guidance_embedding
    if not g:
        return {}
    return {"time_cond_proj_dim": g["time_cond_proj_dim"], "guidance": g.get("guidance", 1.0)}


def load_vae(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, ModelMeta]:
    """A VAE model folder (kind "vae") -> (AutoencoderKL in eval mode on `device`, its
    ModelMeta). dtype: the weights' (None: as stored, fp32)."""
    meta = read_model_meta(path)
    if meta.kind != "vae":
        raise UserError(f"{path}: model kind {meta.kind!r} is not a VAE")
    return _build_vae(Path(path), meta, device, dtype), meta


def _build_vae(
    path: Path, meta: ModelMeta, device: torch.device | str, dtype: torch.dtype | None
) -> nn.Module:
    from ..models.vae import AutoencoderKL, VAEConfig
    from .lazy import build_module, open_safetensors

    state, _ = open_safetensors(path / MODEL_WEIGHTS)
    config = VAEConfig.from_dict(meta.vae)
    vae = build_module(lambda: AutoencoderKL(config), state, "VAE", dtype=dtype, device=device)
    if meta.latent_rgb:
        vae.latent_rgb = torch.tensor(meta.latent_rgb, device=device)
    return channels_last(vae.eval().requires_grad_(False))


def _check_vae_fits(meta: ModelMeta, vae: ModelMeta, where: Path) -> None:
    """A latent model's VAE folder against the latents model.json describes."""
    from ..models.vae import VAEConfig

    if vae.kind != "vae":
        raise UserError(f"{where}: model kind {vae.kind!r} is not a VAE")
    c, latent = VAEConfig.from_dict(vae.vae), meta.latent
    want = (meta.data.channels, latent.image_resolution // meta.data.resolution,
            latent.image_channels)  # fmt: skip
    got = (c.latent_channels, c.downsample_factor, c.out_channels)
    if want != got:
        raise UserError(
            f"{where}: this VAE has {got[0]} latent channels, factor {got[1]} and {got[2]} image "
            f"channels; the model's model.json needs {want[0]}, {want[1]} and {want[2]}"
        )


def channels_last(module: nn.Module) -> nn.Module:
    """Convolution weights in NHWC order, the layout oneDNN's CPU kernels run fastest (the
    activations follow): 1.3-1.5x the images/s of the embedded model in batches of 64, its
    VAE decode 1.6x (docs/text-to-image.md). Results match the NCHW layout to float rounding;
    a loaded model is deterministic either way."""
    return module.to(memory_format=torch.channels_last)


def load_diffusion_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str = "fp32",
) -> LoadedModel:
    """Load a native model folder (None: the embedded default model; an embedded model's name,
    see `model_dir`) onto `device` ("auto":
    CUDA, else MPS, else CPU; see `resolve_device`) with weights in `dtype` (fp32, bf16, or fp16
    on a GPU: the VAE then stays fp32, as SD's overflows in fp16; the text encoder stays fp32).
    Weights stream from the file onto the device, tensor by tensor."""
    from .lazy import check_float_weights, open_safetensors

    folder = model_dir(path)
    view = ModelFolder.read(folder)
    meta = view.meta
    device = resolve_device(device)
    weights = check_dtype(dtype, device)
    low = None if dtype == "fp32" else weights
    vae_meta = None
    if meta.latent is not None:  # every description first, then the weights
        vae_meta = read_model_meta(folder / meta.latent.vae)
        _check_vae_fits(meta, vae_meta, folder / meta.latent.vae)
    text = meta.text_encoder or {}
    for sub in text_encoder_dirs(text):
        for f in sorted((folder / sub).glob("*.safetensors")):
            check_float_weights(open_safetensors(f)[0], f"text encoder {f}")
    state, _ = open_safetensors(folder / MODEL_WEIGHTS)
    model = LoadedModel(
        meta,
        folder,
        denoiser=channels_last(build_denoiser(meta, state, dtype=low, device=device)),
        sha256=file_digest(folder / MODEL_WEIGHTS),
        dtype=dtype,
    )
    if vae_meta is not None:
        vae_dtype = None if dtype == "fp16" else low
        model.vae = _build_vae(folder / meta.latent.vae, vae_meta, device, vae_dtype)
    if text:
        from ..models.text import build_text_encoder

        # fp32 whatever the dtype: its states are the cond every step reuses (one encode a call)
        model.text_encoder = build_text_encoder(text, folder).to(device)
        context = meta.unet.get("cross_attention_dim")
        if model.text_encoder.dim != context:
            raise UserError(
                f"{folder}: the text encoder gives {model.text_encoder.dim}-wide states, but "
                f"the U-Net's cross_attention_dim is {context}"
            )
    return model
