"""API requests -> jobs: check them against the model, decode input images, wrap the pipelines.

Everything a request can get wrong is found here, before the job is queued: the model name
(400/404), a field (422 naming it: the request's settings are resolved and validated by
`SampleSettings.resolve` against the model's defaults), an image (400). The `runner` then loads the
model once, samples with a callback that reports progress and live previews, and encodes the
results as PNGs whose text chunks hold their parameters (`latentforge generate --from-png`
reads them back).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import math
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from .. import sampling
from ..errors import UserError
from ..io.images import from_pil, make_grid, to_pil
from ..io.model_folder import LoadedModel, ModelFolder
from ..pipelines import generate as p_generate
from ..pipelines import img2img as p_img2img
from ..pipelines import inpaint as p_inpaint
from ..pipelines import interpolate as p_interpolate
from ..pipelines import superres as p_superres
from ..pipelines.common import describe_conditioning, labels_from_prompt
from ..pipelines.settings import SampleSettings, SettingsError
from . import schemas
from .config import ServerConfig
from .jobs import Job, JobCancelled, Task
from .store import ModelStore

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
PREVIEW_COST_RATIO = 20  # a preview that took c seconds waits >= 20 c for the next one


class BadImage(UserError):
    """An input image that is not base64 or not a readable image (HTTP 400)."""


class FieldError(UserError):
    """A request field the model or the server's limits reject (HTTP 422 naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ----- images in and out -----------------------------------------------------------------------
def decode_image(data: str, field: str) -> Image.Image:
    """base64 (or a data: URL) -> a loaded PIL image; BadImage naming the field otherwise."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{field}: not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        if max(img.size) > schemas.MAX_SIDE:
            raise BadImage(f"{field}: image larger than {schemas.MAX_SIDE} pixels on a side")
        img.load()
        return img
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types on corrupt data (OSError, SyntaxError, ...)
        kind = type(e).__name__
        raise BadImage(f"{field}: not a readable PNG/JPEG/WebP image ({kind})") from None


def image_tensor(data: str, field: str, shape: tuple[int, ...] | None, channels: int):
    """A base64 image -> (1, C, H, W) in [-1, 1], resized (bicubic) to shape (C, H, W) if given."""
    img = decode_image(data, field)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent = black
        img = Image.alpha_composite(background, img.convert("RGBA"))
    x = from_pil(img, channels)[None]
    if shape is not None and tuple(x.shape[-2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=tuple(shape[1:]), mode="bicubic", antialias=True).clamp(-1, 1)
    return x


def mask_tensor(data: str, size: tuple[int, int]) -> torch.Tensor:
    """A base64 mask (white = regenerate) -> (1, 1, H, W) in {0, 1}, resized nearest."""
    m = (image_tensor(data, "mask", None, 1) + 1) / 2
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="nearest")
    return (m > 0.5).float()


def png_base64(image: torch.Tensor, metadata: dict | None = None, compress_level: int = 6) -> str:
    """(C, H, W) in [-1, 1] -> base64 PNG with `metadata` as text chunks (as io.images.save_png)."""
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        # lists (guidance_interval) as JSON, as `generate --from-png` reads them
        info.add_text(k, json.dumps(v) if isinstance(v, list) else str(v))
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----- request -> task ---------------------------------------------------------------------------
GENERATE = ("generate",)  # model.json "task": what each endpoint can run
TASK_WORDS = {
    "generate": "text/class-to-image",
    "superres": "super-resolution",
    "inpaint": "inpainting",
}


def _pick_model(store: ModelStore, name: str | None, tasks: tuple[str, ...]):
    """(name, view) of the requested model, which must do one of `tasks`; with no name, the
    default model if it does, else the first one that does."""
    want = " or ".join(TASK_WORDS.get(t, t) for t in tasks)
    if name is None:
        default, view = store.view(None)
        if view.task in tasks:
            return default, view
        for other in store.names():
            with contextlib.suppress(UserError, OSError):  # a broken folder is not a candidate
                other, view = store.view(other)
                if view.task in tasks:
                    return other, view
        raise FieldError("model", f"this server has no {want} model")
    name, view = store.view(name)
    if view.task not in tasks:
        got = TASK_WORDS.get(view.task, view.task)
        raise FieldError("model", f"model {name!r} is a {got} model; this needs a {want} model")
    return name, view


class _Prepared:
    """What every request shares, checked before the job is queued: the model (a view of its
    folder) and the sampling settings, resolved against its defaults and this server's limits."""

    def __init__(
        self,
        req,
        store: ModelStore,
        config: ServerConfig,
        guidance: float | None = None,
        tasks: tuple[str, ...] = GENERATE,
        **fields,
    ):
        self.name, self.view = _pick_model(store, req.model, tasks)
        num = getattr(req, "num", 1)
        if num > config.max_num:
            raise FieldError("num", f"num must be <= {config.max_num} on this server")
        steps = req.steps
        if steps is not None and steps > config.max_steps:
            raise FieldError("steps", f"steps must be <= {config.max_steps} on this server")
        if steps is None and self.view.defaults.steps > config.max_steps:
            steps = config.max_steps  # the model's default, capped to the server's limit
        settings = SampleSettings.build(
            sampler=req.sampler, steps=steps, spacing=req.spacing,
            guidance=req.guidance if req.guidance is not None else guidance,
            guidance_interval=req.guidance_interval, knobs=req.knobs, num=num,
            seed=random.randrange(2**31) if req.seed is None else req.seed,
            negative=getattr(req, "negative_prompt", ""), **fields,
        )  # fmt: skip
        try:
            self.settings = settings.resolve(self.view)
        except SettingsError as e:
            raise FieldError(e.field, str(e)) from None
        s = self.settings
        self.params = {
            "model": self.name, "sampler": s.sampler, "steps": s.steps,
            "spacing": s.spacing or "", "guidance": s.guidance,
            "guidance_interval": list(s.guidance_interval), "seed": s.seed,
            **({"knobs": dict(s.knobs)} if s.knobs else {}),
        }  # fmt: skip

    @property
    def seeds(self) -> list[int]:
        return [self.settings.seed + i for i in range(self.settings.num)]


def _conditioning(model: ModelFolder, prompt: str) -> dict:
    """generate's labels / prompts for a request's prompt (the negative is in the settings)."""
    return describe_conditioning(model, prompt)[0]


def txt2img(req: schemas.Txt2ImgRequest, store: ModelStore, config: ServerConfig) -> Task:
    p = _Prepared(req, store, config, layout=req.layout, bf16=req.bf16, width=req.width,
                  height=req.height)  # fmt: skip

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, req.prompt)
        return p_generate.generate(model, p.settings, **cond, callback=callback)

    # stored resolved, so `generate --from-png` reproduces the image whatever the default
    params = {"prompt": req.prompt, "negative": req.negative_prompt, "num": req.num,
              "layout": p.settings.layout, "precision": p.settings.precision,
              "width": p.settings.width, "height": p.settings.height, **p.params}  # fmt: skip
    return Task("txt2img", p.name, params, p.settings.steps, run, p.seeds, preview=req.preview)


def img2img(req: schemas.Img2ImgRequest, store: ModelStore, config: ServerConfig) -> Task:
    p = _Prepared(req, store, config)
    shape = p.view.output_shape
    image = image_tensor(req.image, "image", shape, shape[0])

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, req.prompt)
        return p_img2img.img2img(
            model, image, p.settings, strength=req.strength, callback=callback, **cond
        )

    params = {
        "prompt": req.prompt,
        "negative": req.negative_prompt,
        "num": req.num,
        "strength": req.strength,
        **p.params,
    }
    total = max(1, round(req.strength * p.settings.steps))
    return Task("img2img", p.name, params, total, run, p.seeds, preview=req.preview)


def inpaint(req: schemas.InpaintRequest, store: ModelStore, config: ServerConfig) -> Task:
    p = _Prepared(req, store, config, tasks=("generate", "inpaint"))
    shape = p.view.output_shape
    image = image_tensor(req.image, "image", shape, shape[0])
    mask = mask_tensor(req.mask, shape[1:])
    extra = {
        "strength": req.strength,
        "resample": req.resample,
        "jump": req.jump,
        "feather": req.feather,
    }

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, req.prompt)
        return p_inpaint.inpaint(model, image, mask, p.settings, callback=callback, **extra,
                                 **cond)  # fmt: skip

    params = {
        "prompt": req.prompt,
        "negative": req.negative_prompt,
        "num": req.num,
        **extra,
        **p.params,
    }
    total = max(1, round(req.strength * p.settings.steps))
    return Task("inpaint", p.name, params, total, run, p.seeds, preview=req.preview)


def upscale(req: schemas.UpscaleRequest, store: ModelStore, config: ServerConfig) -> Task:
    p = _Prepared(req, store, config, tasks=("superres",))
    scale = p.view.meta.scale
    if req.scale is not None and req.scale != scale:
        raise FieldError("scale", f"model {p.name!r} upscales x{scale}, not x{req.scale}")
    image = image_tensor(req.image, "image", None, p.view.output_shape[0])
    if max(image.shape[-2:]) > schemas.MAX_UPSCALE_INPUT:
        side = schemas.MAX_UPSCALE_INPUT
        raise FieldError("image", f"images to upscale must be at most {side} pixels on a side")

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, req.prompt)
        return p_superres.upscale(
            model, image, p.settings, scale=scale, noise_level=req.noise_level,
            callback=callback, **cond,
        )  # fmt: skip

    params = {"prompt": req.prompt, "negative": req.negative_prompt, "scale": scale,
              "noise_level": req.noise_level, **p.params}  # fmt: skip
    return Task("upscale", p.name, params, p.settings.steps, run, p.seeds[:1], preview=req.preview)


def interpolate(req: schemas.InterpolateRequest, store: ModelStore, config: ServerConfig) -> Task:
    with_images = req.image_a is not None
    # between images: deterministic DDIM inversion, guidance 1 unless asked (as the CLI does)
    p = _Prepared(req, store, config, guidance=1.0 if with_images else None)
    if with_images and req.sampler not in (None, "ddim"):
        raise FieldError("sampler", "interpolation between images uses the ddim sampler")
    if not with_images and p.settings.sampler in sampling.STOCHASTIC:
        raise FieldError(
            "sampler", f"a walk needs a deterministic sampler, not {p.settings.sampler!r}"
        )
    shape = p.view.output_shape
    images = []
    if with_images:
        images = [image_tensor(getattr(req, f), f, shape, shape[0]) for f in ("image_a", "image_b")]

    def run(model: LoadedModel, callback) -> torch.Tensor:
        ends = {}
        for side, prompt in (("a", req.prompt_a), ("b", req.prompt_b)):
            label = labels_from_prompt(prompt, model.class_names) if model.num_classes else None
            ends[f"labels_{side}"] = label
            ends[f"prompts_{side}"] = "" if model.num_classes else prompt
        kw = {"frames": req.frames, "callback": callback, **ends}
        if with_images:
            return p_interpolate.interpolate(model, *images, p.settings, **kw)
        return p_interpolate.walk(model, req.seed_a, req.seed_b, p.settings, **kw)

    params = {"prompt_a": req.prompt_a, "prompt_b": req.prompt_b, "frames": req.frames, **p.params}
    if not with_images:
        params.update(seed_a=req.seed_a, seed_b=req.seed_b)
        del params["seed"]
    else:
        params["sampler"] = "ddim"
    return Task("interpolate", p.name, params, p.settings.steps, run, preview=req.preview)


BUILDERS = {
    "txt2img": txt2img,
    "img2img": img2img,
    "inpaint": inpaint,
    "upscale": upscale,
    "interpolate": interpolate,
}


# ----- running a job -----------------------------------------------------------------------------
def preview_base64(model: LoadedModel, denoised: torch.Tensor) -> str:
    """The x0 estimate, decoded cheaply, as one PNG (a grid when the batch holds several)."""
    images = model.preview(denoised[:16]).clamp(-1, 1)  # (B, C, H, W)
    grid = images[0] if len(images) == 1 else make_grid(images, pad=1)
    return png_base64(grid, compress_level=1)  # shown once, for a moment: fast over small


def make_runner(store: ModelStore, config: ServerConfig) -> Callable[[Job], list[dict]]:
    def runner(job: Job) -> list[dict]:
        task, t = job.task, job.timings
        start = time.monotonic()
        model = store.get(task.model)
        t["load_s"] = time.monotonic() - start
        if job.cancel_requested:
            raise JobCancelled
        # Live previews: the first one interval in (a job done sooner needs none), then one per
        # interval but never more than ~5% of the time, and none at the last step (the result
        # itself follows at once).
        next_preview = time.monotonic() + config.preview_interval if task.preview else math.inf
        preview_s = 0.0

        def callback(step, sigma, x, denoised) -> None:
            nonlocal next_preview, preview_s
            if job.cancel_requested:
                raise JobCancelled
            preview, step = None, int(step) + 1
            now = time.monotonic()
            if now >= next_preview and step < task.total:
                preview = preview_base64(model, denoised)
                cost = time.monotonic() - now
                preview_s += cost
                next_preview = now + max(config.preview_interval, PREVIEW_COST_RATIO * cost)
            job.report(step, preview)

        start = time.monotonic()
        images = task.run(model, callback)
        t["sample_s"] = time.monotonic() - start - preview_s
        t["preview_s"] = preview_s
        start = time.monotonic()
        results = []
        for i, image in enumerate(images):
            meta = {**task.parameters, "model_sha256": model.sha256, "kind": task.kind}
            if task.seeds is not None and i < len(task.seeds):
                # each image alone: seeds are per image, so (seed + i, num 1) redraws it
                meta.update(seed=task.seeds[i], num=1)
            else:
                meta["index"] = i
            meta.pop("knobs", None)
            if task.parameters.get("knobs"):
                meta["knobs"] = ",".join(f"{k}={v}" for k, v in task.parameters["knobs"].items())
            results.append(
                {
                    "png": png_base64(image, meta),
                    "width": image.shape[-1],
                    "height": image.shape[-2],
                    "parameters": meta,
                }
            )
        t["encode_s"] = time.monotonic() - start
        return results

    return runner
