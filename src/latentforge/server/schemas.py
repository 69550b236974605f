"""Request and response bodies of the HTTP API. These pydantic models are the OpenAPI schema.

Hard per-request limits live here (they show up in /openapi.json); a server can be started with
lower ones (`ServerConfig.max_steps` / `max_num`), checked in the handlers with the same 422.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import UserError
from ..pipelines.layout import layout_names
from ..prompt_syntax import parse_prompt
from ..sampling import KNOB_RANGES
from ..schedules import SPACINGS

MAX_STEPS = 200
MAX_NUM = 16
MAX_FRAMES = 32
MAX_SIDE = 4096  # width / height fields, and the largest input image side decoded
MAX_SEED = 2**53 - 1  # exact in JavaScript numbers
MAX_UPSCALE_INPUT = 256  # pixels on a side of an image to upscale
MAX_IMAGE_CHARS = 8_000_000  # one base64 image (about 6 MB of PNG)
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


def _valid_unicode(text: str) -> str:
    # lone surrogates pass JSON decoding but cannot be encoded as UTF-8 (or into PNG text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return text


def _valid_prompt(text: str) -> str:
    # A1111's weighting syntax is read when the job runs; a malformed prompt is a 422 up front
    try:
        parse_prompt(text)
    except UserError as e:
        raise ValueError(str(e).removeprefix("prompt: ")) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
PromptText = Annotated[str, AfterValidator(_valid_unicode), AfterValidator(_valid_prompt)]
Base64Image = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_IMAGE_CHARS,
        description="base64-encoded PNG (JPEG and WebP also read), or a data: URL",
    ),
]


KnobValue = int | float | bool | Annotated[Text, Field(max_length=64)]


class _Request(BaseModel):
    # a misspelt field is a 422, not silently ignored; NaN and infinities never pass a float
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingParams(_Request):
    model: Text | None = Field(
        None, max_length=128, description="model name (see /v1/models); default: the server's"
    )
    sampler: Text | None = Field(
        None,
        max_length=64,
        description="see /v1/samplers, or an A1111 name ('DPM++ 2M Karras', 'Euler a'); "
        "default: the model's",
    )
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="default: the model's")
    spacing: Literal[SPACINGS] | None = Field(None, description="noise-level spacing")
    guidance: float | None = Field(
        None, ge=0, le=50, description="classifier-free guidance scale; default: the model's"
    )
    guidance_interval: list[float | None] | None = Field(
        None, min_length=2, max_length=2,
        description="[lo, hi]: guide only where lo < sigma <= hi (hi null: no bound); "
        "default: the model's; [0, null]: every step",
    )  # fmt: skip
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="image i uses seed + i; default: random"
    )
    knobs: dict[Annotated[Text, Field(max_length=64)], KnobValue] = Field(
        default_factory=dict,
        max_length=16,
        description="sampler options, e.g. {'eta': 0.5}; numbers finite, and "
        + ", ".join(f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in KNOB_RANGES.items()),
    )
    preview: bool = Field(
        True, description="live x0 previews while sampling; false: none (a little faster)"
    )

    @field_validator("knobs", mode="before")
    @classmethod
    def _finite_knobs(cls, knobs: Any) -> Any:
        """One error naming a NaN / infinite knob (before the value union, which would give
        four); the ranges are checked with the sampler (`sampling.check_knobs`, a 422 too)."""
        for name, value in knobs.items() if isinstance(knobs, dict) else ():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"knob {name!r} must be a finite number, got {value}")
        return knobs


class PromptParams(_Request):
    prompt: PromptText = Field(
        "", max_length=2000, description="text (A1111's weighting syntax), or a class name"
    )
    negative_prompt: PromptText = Field("", max_length=2000)


MAX_LORAS = 8  # LoRAs in one request


class LoraParams(_Request):
    loras: list[Annotated[Text, Field(max_length=160)]] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRAs as 'NAME' or 'NAME:SCALE' (default scale 1), NAME from "
        "/sdapi/v1/loras (the server's loras folder); applied for this job only",
    )


MAX_CONTROLS = 4  # ControlNets in one request
PREPROCESSORS = ("canny", "scribble", "sketch", "none")


class ControlUnit(_Request):
    image: Base64Image = Field(description="the control image, any size (resized to the output)")
    controlnet: Annotated[Text, Field(max_length=160)] | None = Field(
        None,
        description="a ControlNet folder's name in the server's controlnets folder; default: "
        "the model's own (model.json sampling.controlnet)",
    )
    scale: float = Field(1.0, ge=0, le=4, description="ControlNet strength")
    start: float = Field(0.0, ge=0, le=1, description="fraction of the steps before it acts")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the steps after which it stops")
    preprocess: Literal[PREPROCESSORS] | None = Field(
        None,
        description="turn the image into the ControlNet's input; default: the preprocessor the "
        "ControlNet was trained with; none: as it is",
    )
    guess_mode: bool = Field(False, description="act on the conditional half of guidance only")

    @model_validator(mode="after")
    def _span(self) -> ControlUnit:
        if self.start >= self.end:
            raise ValueError(f"start {self.start:g} must be below end {self.end:g}")
        return self


class ControlParams(_Request):
    controls: list[ControlUnit] = Field(
        default_factory=list,
        max_length=MAX_CONTROLS,
        description="ControlNets with their control images (docs/editing.md), summed",
    )


class Txt2ImgRequest(SamplingParams, PromptParams, LoraParams, ControlParams):
    num: int = Field(1, ge=1, le=MAX_NUM, description="batch size")
    width: int | None = Field(
        None, ge=1, le=MAX_SIDE,
        description="output width in pixels, a multiple of the model's grid; default: the model's",
    )  # fmt: skip
    height: int | None = Field(
        None, ge=1, le=MAX_SIDE,
        description="output height in pixels, a multiple of the model's grid; default: the model's",
    )  # fmt: skip
    vae_tiling: Literal["auto", "on", "off"] = Field(
        "auto",
        description="decode in tiles: auto above 4x the model's trained area, on always (least "
        "memory), off never",
    )
    layout: Literal[tuple(layout_names())] | None = Field(
        None,
        description="regional prompting (text models): 'shapes' draws each object of a "
        "two-object prompt in its own box under its own prompt; default: the model's",
    )
    bf16: bool = Field(
        False,
        description="bf16 autocast for the denoiser and decoder (generate --bf16): about 1.5x "
        "faster on CPUs with AVX512-BF16 or AMX, slow on others",
    )


class Img2ImgRequest(SamplingParams, PromptParams, LoraParams, ControlParams):
    image: Base64Image
    strength: float = Field(0.6, ge=0, le=1, description="0 keeps the image, 1 ignores it")
    num: int = Field(1, ge=1, le=MAX_NUM)


class InpaintRequest(SamplingParams, PromptParams, LoraParams, ControlParams):
    image: Base64Image
    mask: Base64Image = Field(description="base64 PNG; white = regenerate, black = keep")
    strength: float = Field(1.0, ge=0, le=1, description="below 1: start from the noised image")
    resample: int = Field(1, ge=1, le=8, description="RePaint resampling passes")
    jump: int = Field(1, ge=1, le=MAX_STEPS, description="RePaint jump length")
    feather: int = Field(0, ge=0, le=16, description="soften the seam (pixels)")
    num: int = Field(1, ge=1, le=MAX_NUM)


class UpscaleRequest(SamplingParams, PromptParams):
    model: Text | None = Field(
        None, max_length=128, description="a super-resolution model; default: the first one"
    )
    image: Base64Image
    scale: int | None = Field(None, ge=2, le=8, description="must be the model's; default: it")
    noise_level: float = Field(0.1, ge=0, le=1, description="noise added to the low-res input")


class InterpolateRequest(SamplingParams):
    image_a: Base64Image | None = None
    image_b: Base64Image | None = None
    seed_a: int | None = Field(None, ge=0, le=MAX_SEED, description="walk between two seeds")
    seed_b: int | None = Field(None, ge=0, le=MAX_SEED)
    prompt_a: PromptText = Field("", max_length=2000)
    prompt_b: PromptText = Field("", max_length=2000)
    frames: int = Field(8, ge=2, le=MAX_FRAMES)

    @model_validator(mode="after")
    def _images_or_seeds(self) -> InterpolateRequest:
        images = (self.image_a is not None, self.image_b is not None)
        seeds = (self.seed_a is not None, self.seed_b is not None)
        if images == (True, True) and seeds == (False, False):
            return self
        if seeds == (True, True) and images == (False, False):
            return self
        raise ValueError("give image_a and image_b, or seed_a and seed_b (not both)")


# ----- responses --------------------------------------------------------------------------------
class JobAccepted(BaseModel):
    id: str
    status: Literal[JOB_STATUSES]
    queue_position: int | None = None


class ImageResult(BaseModel):
    png: str = Field(description="base64 PNG; its text chunks hold `parameters`")
    width: int
    height: int
    parameters: dict[str, Any]


class JobInfo(BaseModel):
    id: str
    kind: str
    status: Literal[JOB_STATUSES]
    step: int
    total: int
    progress: float = Field(description="step / total, 1 when done")
    queue_position: int | None = None
    cancel_requested: bool = False
    preview: str | None = Field(None, description="base64 PNG of the latest x0 estimate")
    images: list[ImageResult] = Field(default_factory=list)
    error: str | None = None
    parameters: dict[str, Any]
    timings: dict[str, float]


class ModelInfo(BaseModel):
    name: str
    status: Literal["ok"] = "ok"
    default: bool
    task: str = Field(description="generate, superres or inpaint")
    scale: int | None = Field(None, description="superres models: the upscaling factor")
    loaded: bool
    width: int
    height: int
    channels: int
    latent: bool
    conditioning: Literal["text", "class", "none"]
    class_names: list[str]
    defaults: dict[str, Any]
    size_multiple: int = Field(description="width / height are multiples of this")
    max_side: int = Field(description="the largest width / height this model takes")


class BrokenModelInfo(BaseModel):
    """A folder in the models directory whose model.json does not load: requests naming it get
    a 422 with the same reason."""

    name: str
    status: Literal["broken"] = "broken"
    default: bool = False
    error: str


class ControlNetInfo(BaseModel):
    name: str = Field(description="what a request's controls[].controlnet names")
    preprocess: str = Field(description="the preprocessor its control images went through")
    base: str | None = Field(None, description="the base model it was made for")


class SamplerInfo(BaseModel):
    name: str
    stochastic: bool
    knobs: dict[str, Any]
    doc: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    queued: int
    running: int
    workers: int
    max_queue: int
