"""One settings object for sampling: what every pipeline, the CLI, the server and the
evaluators pass instead of a dozen keyword arguments.

`SampleSettings` holds the user's choices (None = the model folder's default), `resolve`
fills the defaults from model.json and validates everything once, and the resolved object
is what the pipelines run and what a PNG records (`to_png_meta` / `from_png_meta`), so
`generate --from-png` reproduces an image whatever the model's defaults are later. New
settings (device, output size, adapters) are new fields here, not new parameters in every
pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import sampling
from ..errors import UserError
from ..guidance import Region, interval_to_json, parse_interval
from ..io import a1111
from ..io.model_folder import ModelFolder
from ..schedules import SPACINGS
from .layout import check_layout

PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: GPUs only (checked where the model runs)
VAE_TILING = ("auto", "on", "off")
MAX_SIDE = 4096  # output pixels on a side, whatever the model
MAX_SCALE = 8  # ... and at most this many times the model's training resolution (memory guard)
# SDXL's micro-conditioning settings (`resolve_micro`)
MICRO_SIZES = (
    "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
    "negative_crops_coords_top_left", "negative_target_size",
)  # fmt: skip
MICRO_SCORES = ("aesthetic_score", "negative_aesthetic_score")
MAX_MICRO_SIZE = 65536  # pixels: SDXL saw at most a few thousand; anything past this is a typo


class SettingsError(UserError):
    """A setting the model or the sampler rejects; `field` names it (the server's 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: None means "the model's default" until `resolve` fills it in.

    guidance_interval: (lo, hi) sigmas outside which guidance is skipped, hi None for no upper
    bound; resolved, it is always a pair ((0, None) = every step). regions: boxes with their
    own prompts (text models), which replace the layout planner; resolved, layout is "none"
    then (and for models without a text encoder). knobs: the sampler's extra options
    (`sampling.sampler_knobs`), e.g. {"eta": 0.5}. Image i of a call uses seed `seed + i`.
    width / height: the output size in pixels (None: the model's training resolution);
    multiples of `size_multiple(model)`, the VAE's downsampling times the U-Net's.
    vae_tiling: "auto" decodes in tiles above `pipelines.common.TILED_DECODE_AREA` times the
    trained area, "on" always (least memory), "off" never (tiles differ slightly from one
    pass: GroupNorm sees one tile).
    sampler may be an A1111 name ("DPM++ 2M Karras", "Euler a"): `resolve` turns it into
    latentforge's sampler, spacing (unless set) and knobs (`io.a1111`); spacing may be an A1111
    schedule type ("Karras"). loras: "NAME:SCALE" strings, recorded here (PNG metadata, A1111's
    `<lora:NAME:SCALE>`) and applied where the model is loaded. embeddings: "TRIGGER:HASH" of
    the textual-inversion embeddings the prompts use (`io.embeddings.used_embeddings`), recorded
    only (PNG metadata, A1111's `TI hashes`); embeddings are loaded with the model.
    """

    sampler: str | None = None
    steps: int | None = None
    spacing: str | None = None
    guidance: float | None = None
    guidance_interval: tuple[float, float | None] | None = None
    negative: str = ""
    layout: str | None = None
    regions: tuple[Region, ...] = ()
    seed: int = 0
    num: int = 1
    precision: str = "fp32"
    width: int | None = None
    height: int | None = None
    knobs: Mapping[str, Any] = field(default_factory=dict)
    vae_tiling: str = "auto"
    loras: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()
    # SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2), sizes (height, width) and the
    # crop's (top, left) in pixels. Resolved for an SDXL model: original = target = the output
    # size and crop (0, 0) where unset (SDXL's defaults), each negative one as its positive
    # one (diffusers differs in one case: given negative sizes, its negative crop is (0, 0)),
    # the refiner's aesthetic scores 6.0 and 2.5 (diffusers' defaults); other models take
    # none of them (`resolve_micro`).
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    FIELDS = (
        "sampler", "steps", "spacing", "guidance", "guidance_interval", "negative", "layout",
        "regions", "seed", "num", "precision", "width", "height", "knobs", "vae_tiling", "loras",
        "embeddings",
        *(MICRO_SIZES + MICRO_SCORES),
    )  # fmt: skip

    # ----- building -----------------------------------------------------------------------
    @classmethod
    def build(cls, base: SampleSettings | None = None, **kwargs: Any) -> SampleSettings:
        """`base` (or the defaults) with `kwargs` applied: keys that name a field set it (None
        leaves it as it is), `bf16=True` sets precision, and any other key is a sampler knob.
        This is what every pipeline does with its keyword arguments."""
        base = base or cls()
        changes: dict[str, Any] = {}
        knobs = dict(base.knobs)
        for key, value in kwargs.items():
            if key == "bf16":
                if value is not None:
                    changes["precision"] = "bf16" if value else "fp32"
            elif key == "knobs":
                knobs.update(value or {})
            elif key in cls.FIELDS:
                if value is not None:
                    changes[key] = value
            else:
                knobs[key] = value
        for key in ("regions", "loras", "embeddings"):
            if key in changes:
                changes[key] = tuple(changes[key])
        if "guidance_interval" in changes:
            changes["guidance_interval"] = tuple(changes["guidance_interval"])
        return dataclasses.replace(base, **changes, knobs=knobs)

    def replace(self, **changes: Any) -> SampleSettings:
        return dataclasses.replace(self, **changes)

    # ----- resolving against a model ------------------------------------------------------
    def resolve(self, model: ModelFolder) -> SampleSettings:
        """Every unset field from the model folder's defaults, everything validated: a
        `SettingsError` naming the field for anything the model or the sampler rejects."""
        d = model.defaults
        sampler, spacing, knobs = self.sampler or d.sampler, self.spacing, dict(self.knobs)
        if sampler not in sampling.SAMPLERS:  # an A1111 name ("DPM++ 2M Karras")?
            try:
                sampler, a_spacing, a_knobs = a1111.sampler_from_a1111(str(sampler))
            except UserError as e:
                raise SettingsError("sampler", str(e)) from None
            spacing, knobs = spacing or a_spacing, {**a_knobs, **knobs}
        if spacing is not None and spacing not in SPACINGS:  # an A1111 schedule type?
            try:
                spacing = a1111.spacing_from_a1111(str(spacing))
            except UserError as e:
                raise SettingsError("spacing", str(e)) from None
        steps = d.steps if self.steps is None else self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SettingsError("steps", f"steps must be a positive integer, got {steps}")
        guidance = d.guidance if self.guidance is None else self.guidance
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise SettingsError("guidance", f"guidance must be a finite number, got {guidance}")
        try:
            interval = parse_interval(
                d.guidance_interval if self.guidance_interval is None else self.guidance_interval
            )
        except UserError as e:
            raise SettingsError("guidance_interval", str(e)) from None
        if not isinstance(self.num, int) or self.num < 1:
            raise SettingsError("num", f"num must be >= 1, got {self.num}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SettingsError("seed", f"seed must be an integer, got {self.seed!r}")
        if self.precision not in PRECISIONS:
            raise SettingsError(
                "precision", f"precision must be one of {', '.join(PRECISIONS)}, got "
                f"{self.precision!r}"
            )  # fmt: skip
        if self.vae_tiling not in VAE_TILING:
            raise SettingsError(
                "vae_tiling", f"vae_tiling must be one of {', '.join(VAE_TILING)}, got "
                f"{self.vae_tiling!r}"
            )  # fmt: skip
        try:
            sampling.check_knobs(sampler, knobs)
        except UserError as e:
            raise SettingsError("knobs", str(e)) from None
        for spec in self.loras:
            try:
                name, _ = a1111.lora_name_and_scale(str(spec))
            except UserError as e:
                raise SettingsError("loras", str(e)) from None
            if not name.strip():
                raise SettingsError("loras", f"LoRA {spec!r}: give NAME or NAME:SCALE")
        text = model.conditioning == "text"
        if self.regions and not text:
            raise SettingsError("regions", "regions need a text-conditioned model")
        # explicit regions replace the planner; models without a text encoder plan nothing
        try:
            layout = check_layout(self.layout or d.layout or "none")
        except UserError as e:
            raise SettingsError("layout", str(e)) from None
        if not text or self.regions:
            layout = "none"
        width, height = _check_size(model, self.width, self.height)
        lo, hi = interval_to_json(interval)
        return dataclasses.replace(
            self, sampler=sampler, steps=steps, spacing=spacing or d.spacing,
            guidance=float(guidance), guidance_interval=(lo, hi), layout=layout, width=width,
            height=height, knobs=knobs, **resolve_micro(self, model, (height, width)),
        )  # fmt: skip

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def latent_size(self, model: ModelFolder) -> tuple[int, int]:
        """(height, width) of what the denoiser works on at this output size (resolved)."""
        f = model.output_shape[-1] // model.image_shape[-1]
        return self.height // f, self.width // f

    @property
    def interval(self) -> tuple[float, float] | None:
        """The guidance interval as the guidance wrapper takes it (None: every step)."""
        return parse_interval(self.guidance_interval)

    # ----- records ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A plain-JSON record of the settings (reports, the server's job parameters)."""
        out = {k: getattr(self, k) for k in self.FIELDS}
        out["guidance_interval"] = (
            None if self.guidance_interval is None else list(self.guidance_interval)
        )
        out["regions"] = [r.to_json() for r in self.regions]
        out["knobs"] = dict(self.knobs)
        out["loras"] = list(self.loras)
        out["embeddings"] = list(self.embeddings)
        return out

    def to_png_meta(self) -> dict[str, str]:
        """The PNG text chunks `generate` writes (every value a string; resolve first, so a
        reader never falls back to a model default)."""
        interval = None if self.guidance_interval is None else list(self.guidance_interval)
        return {
            "negative": self.negative, "seed": str(self.seed), "num": str(self.num),
            "sampler": self.sampler or "", "steps": "" if self.steps is None else str(self.steps),
            "guidance": "" if self.guidance is None else str(self.guidance),
            "guidance_interval": json.dumps(interval), "spacing": self.spacing or "",
            "options": json.dumps(dict(self.knobs), sort_keys=True) if self.knobs else "",
            "layout": self.layout or "",
            "regions": json.dumps([r.to_json() for r in self.regions]) if self.regions else "",
            "precision": self.precision,
            "width": "" if self.width is None else str(self.width),
            "height": "" if self.height is None else str(self.height),
            "vae_tiling": self.vae_tiling,
            "loras": json.dumps(list(self.loras)) if self.loras else "",
            "embeddings": json.dumps(list(self.embeddings)) if self.embeddings else "",
            **{k: json.dumps(getattr(self, k)) for k in MICRO_SIZES + MICRO_SCORES
               if getattr(self, k) is not None},  # SDXL's: only where set
        }  # fmt: skip

    @classmethod
    def from_png_meta(cls, text: Mapping[str, str], where: str = "PNG") -> SampleSettings:
        """The settings a PNG's text chunks hold (`to_png_meta`, and the PNGs of every earlier
        version: no layout is "none", no precision is fp32; A1111's `parameters` chunk where
        no latentforge chunks are: `io.images.with_a1111`)."""
        if "seed" not in text or "steps" not in text:
            raise UserError(f"{where} holds no latentforge generate parameters")
        try:
            # "" / "null": settings written unresolved (the model's default)
            interval = json.loads(text.get("guidance_interval") or "null")
            guidance = text.get("guidance", "1.0")
            return cls(
                sampler=text.get("sampler") or None,
                steps=int(text["steps"]),
                spacing=text.get("spacing") or None,
                guidance=float(guidance) if guidance else None,
                guidance_interval=None if interval is None else tuple(interval),
                negative=text.get("negative", ""),
                # PNGs from before regional prompting: no layout
                layout=text.get("layout") or "none",
                regions=tuple(Region.from_json(r) for r in json.loads(text["regions"]))
                if text.get("regions")
                else (),
                seed=int(text["seed"]),
                num=int(text.get("num", 1)),
                # PNGs from before --bf16 hold no precision: fp32
                precision="bf16" if text.get("precision") == "bf16" else "fp32",
                # PNGs from before --width / --height: the model's size
                width=int(text["width"]) if text.get("width") else None,
                height=int(text["height"]) if text.get("height") else None,
                knobs=json.loads(text["options"]) if text.get("options") else {},
                vae_tiling=text.get("vae_tiling") or "auto",
                loras=tuple(str(x) for x in json.loads(text["loras"])) if text.get("loras") else (),
                embeddings=tuple(str(x) for x in json.loads(text["embeddings"]))
                if text.get("embeddings")
                else (),
                **{k: json.loads(text[k]) for k in MICRO_SCORES if text.get(k)},
                **{k: tuple(json.loads(text[k])) for k in MICRO_SIZES if text.get(k)},
            )
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{where}: unreadable generate parameters ({e})") from None


def resolve_micro(s: SampleSettings, model: ModelFolder, size: tuple[int, int]) -> dict:
    """SDXL's micro-conditioning fields resolved (see the fields' comment); a SettingsError
    for one the model does not take or out of range."""
    text = model.meta.text_encoder or {}
    sdxl, refiner = text.get("type") == "sdxl", bool(text.get("requires_aesthetics_score"))
    takes: set[str] = set()
    if sdxl:
        takes = {"original_size", "crops_coords_top_left", "negative_original_size",
                 "negative_crops_coords_top_left"}  # fmt: skip
        takes |= set(MICRO_SCORES) if refiner else {"target_size", "negative_target_size"}
    out: dict[str, Any] = {}
    for key in MICRO_SIZES + MICRO_SCORES:
        value = getattr(s, key)
        if value is None:
            continue
        if key not in takes:
            raise SettingsError(key, f"{key} is SDXL's " + (
                "refiner's" if key in MICRO_SCORES else "base model's") + " conditioning; "
                "this model does not take it")  # fmt: skip
        if key in MICRO_SCORES:
            bad = isinstance(value, bool) or not isinstance(value, (int, float))
            if bad or not math.isfinite(value):
                raise SettingsError(key, f"{key} must be a finite number, got {value!r}")
            out[key] = float(value)
            continue
        low = 0 if "crops" in key else 1
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
            or not all(low <= v <= MAX_MICRO_SIZE for v in value)
        ):
            raise SettingsError(key, f"{key} must be two integers (height, width) in "
                                f"{low}..{MAX_MICRO_SIZE}, got {value!r}")  # fmt: skip
        out[key] = tuple(value)
    if not sdxl:
        return out
    defaults = {"original_size": size, "crops_coords_top_left": (0, 0)}
    defaults |= {"aesthetic_score": 6.0} if refiner else {"target_size": size}
    for key, value in defaults.items():
        out.setdefault(key, value)
        out.setdefault(f"negative_{key}", 2.5 if key == "aesthetic_score" else out[key])
    return out


def size_multiple(model: ModelFolder) -> int:
    """Output sizes are multiples of this: the VAE's downsampling factor times the U-Net's
    (2 per level below the first), so every down-sampled grid has whole cells."""
    f = model.output_shape[-1] // model.image_shape[-1]
    levels = len((model.meta.unet or {}).get("block_out_channels", [0]))
    return f * 2 ** max(levels - 1, 0)


def max_side(model: ModelFolder) -> int:
    """The largest width / height the model takes: MAX_SCALE times its training resolution
    (a memory guard: attention grows with the square of the pixels), at most MAX_SIDE."""
    return min(MAX_SIDE, MAX_SCALE * max(model.output_shape[1:]))


def _check_size(model: ModelFolder, width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height) in output pixels: the model's where unset; SettingsError naming the
    side that is not a positive multiple of `size_multiple` or over the memory guard."""
    _, res_h, res_w = model.output_shape
    m = size_multiple(model)
    limit = max_side(model)
    out = []
    for name, value, default in (("width", width, res_w), ("height", height, res_h)):
        value = default if value is None else value
        if value == default:  # the training resolution is always allowed
            out.append(value)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < m or value % m:
            raise SettingsError(name, f"{name} must be a positive multiple of {m} for this "
                                f"model, got {value!r}")  # fmt: skip
        if value > limit:
            raise SettingsError(name, f"{name} {value} is over this model's limit of {limit} "
                                f"pixels ({MAX_SCALE}x its {max(res_h, res_w)}, at most "
                                f"{MAX_SIDE})")  # fmt: skip
        out.append(value)
    return out[0], out[1]


def per_image(values: Sequence, num: int, what: str) -> list:
    """One value for every image, or exactly one per image."""
    if len(values) == 1:
        return list(values) * num
    if len(values) != num:
        raise UserError(f"got {len(values)} {what} for {num} images")
    return list(values)
