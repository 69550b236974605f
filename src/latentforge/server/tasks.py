"""API requests -> jobs: check them against the model, decode input images, wrap the pipelines.

Everything a request can get wrong is found here, before the job is queued: the model name
(400/404), a field (422 naming it), an image (400). The editing pipelines are imported when a
request needs them, so a missing module is a 501 until it lands. The `runner` then loads the
model once, samples with a callback that reports progress and live previews, and encodes the
results as PNGs whose text chunks hold their parameters (`latentforge generate --from-png`
reads them back).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
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
from ..io.model_folder import LoadedModel
from ..pipelines.generate import describe_conditioning, labels_from_prompt
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


class PipelineMissing(Exception):
    """The pipeline module for an endpoint is not installed yet (HTTP 501)."""


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
def _pipeline(modules: tuple[str, ...], attr: str, what: str) -> Callable:
    """`attr` from the first of latentforge.pipelines.<modules> that exists (else a 501)."""
    names = [f"latentforge.pipelines.{m}" for m in modules]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            broken = e  # the module exists but something it imports does not
        except Exception as e:  # a broken module: 501 with the reason, not a 500
            broken = e
        else:
            fn = getattr(module, attr, None)
            if fn is None:
                raise PipelineMissing(f"{what} is not available yet: {name} has no {attr}()")
            return fn
        raise PipelineMissing(f"{what} is not available: {name} failed to import ({broken})")
    raise PipelineMissing(f"{what} is not available yet: {' / '.join(names)} is not installed")


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
    """The parts every request shares, checked: model, sampler, steps, guidance, seed."""

    def __init__(
        self,
        req,
        store: ModelStore,
        config: ServerConfig,
        guidance: float | None = None,
        tasks: tuple[str, ...] = GENERATE,
    ):
        from ..guidance import interval_to_json
        from ..pipelines.generate import resolve_guidance_interval, sampling_defaults

        self.name, self.view = _pick_model(store, req.model, tasks)
        if req.sampler is not None and req.sampler not in sampling.SAMPLERS:
            names = sorted(sampling.SAMPLERS)
            raise FieldError("sampler", f"unknown sampler {req.sampler!r}; choose one of {names}")
        guidance = req.guidance if req.guidance is not None else guidance
        self.sampler, self.steps, self.guidance = sampling_defaults(
            self.view, req.sampler, req.steps, guidance
        )
        try:
            interval = resolve_guidance_interval(self.view, req.guidance_interval)
        except UserError as e:
            raise FieldError("guidance_interval", str(e)) from None
        self.guidance_interval = interval_to_json(interval)
        if self.steps > config.max_steps:
            if req.steps is not None:
                raise FieldError("steps", f"steps must be <= {config.max_steps} on this server")
            self.steps = config.max_steps  # the model's default, capped to the server's limit
        num = getattr(req, "num", 1)
        if num > config.max_num:
            raise FieldError("num", f"num must be <= {config.max_num} on this server")
        # (inspect.signature is a noticeable part of a request: only when knobs are given)
        accepted = sampling.sampler_knobs(self.sampler) if req.knobs else {}
        unknown = sorted(set(req.knobs) - set(accepted))
        if unknown:
            raise FieldError(
                "knobs",
                f"sampler {self.sampler!r} has no option(s) {unknown}; "
                f"it accepts {sorted(accepted)}",
            )
        self.knobs = dict(req.knobs)
        self.seed = random.randrange(2**31) if req.seed is None else req.seed
        self.spacing = req.spacing or self.view.defaults.spacing or ""
        self.params = {
            "model": self.name,
            "sampler": self.sampler,
            "steps": self.steps,
            "spacing": self.spacing,
            "guidance": self.guidance,
            "guidance_interval": self.guidance_interval,
            "seed": self.seed,
            **({"knobs": self.knobs} if self.knobs else {}),
        }

    def sampling_kwargs(self) -> dict:
        return {
            "seed": self.seed,
            "sampler": self.sampler,
            "steps": self.steps,
            "spacing": self.spacing or None,
            "guidance": self.guidance,
            "guidance_interval": self.guidance_interval,
            **self.knobs,
        }


def _conditioning(model: LoadedModel, prompt: str, negative: str) -> dict:
    cond, _ = describe_conditioning(model, prompt)
    return {**cond, "negative": negative or None}


def txt2img(req: schemas.Txt2ImgRequest, store: ModelStore, config: ServerConfig) -> Task:
    p = _Prepared(req, store, config)
    _, height, width = p.view.output_shape
    for field, value, want in (("width", req.width, width), ("height", req.height, height)):
        if value is not None and value != want:
            raise FieldError(field, f"{field} must be {want} (the model's resolution)")
    from ..pipelines.generate import generate, resolve_layout

    # stored resolved, so `generate --from-png` reproduces the image whatever the default
    layout = resolve_layout(p.view, req.layout) if p.view.conditioning == "text" else "none"

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, req.prompt, req.negative_prompt)
        return generate(model, **cond, num=req.num, callback=callback, layout=layout,
                        bf16=req.bf16, **p.sampling_kwargs())  # fmt: skip

    params = {"prompt": req.prompt, "negative": req.negative_prompt, "num": req.num,
              "layout": layout, "precision": "bf16" if req.bf16 else "fp32",
              **p.params}  # fmt: skip
    seeds = [p.seed + i for i in range(req.num)]
    return Task("txt2img", p.name, params, p.steps, run, seeds, preview=req.preview)


def img2img(req: schemas.Img2ImgRequest, store: ModelStore, config: ServerConfig) -> Task:
    fn = _pipeline(("img2img",), "img2img", "img2img")
    p = _Prepared(req, store, config)
    shape = p.view.output_shape
    image = image_tensor(req.image, "image", shape, shape[0])

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, req.prompt, req.negative_prompt)
        return fn(
            model,
            image,
            strength=req.strength,
            num=req.num,
            callback=callback,
            **cond,
            **p.sampling_kwargs(),
        )

    params = {
        "prompt": req.prompt,
        "negative": req.negative_prompt,
        "num": req.num,
        "strength": req.strength,
        **p.params,
    }
    total = max(1, round(req.strength * p.steps))
    seeds = [p.seed + i for i in range(req.num)]
    return Task("img2img", p.name, params, total, run, seeds, preview=req.preview)


def inpaint(req: schemas.InpaintRequest, store: ModelStore, config: ServerConfig) -> Task:
    fn = _pipeline(("inpaint",), "inpaint", "inpainting")
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
        cond = _conditioning(model, req.prompt, req.negative_prompt)
        return fn(
            model,
            image,
            mask,
            num=req.num,
            callback=callback,
            **extra,
            **cond,
            **p.sampling_kwargs(),
        )

    params = {
        "prompt": req.prompt,
        "negative": req.negative_prompt,
        "num": req.num,
        **extra,
        **p.params,
    }
    total = max(1, round(req.strength * p.steps))
    seeds = [p.seed + i for i in range(req.num)]
    return Task("inpaint", p.name, params, total, run, seeds, preview=req.preview)


def upscale(req: schemas.UpscaleRequest, store: ModelStore, config: ServerConfig) -> Task:
    fn = _pipeline(("superres", "upscale"), "upscale", "upscaling")
    p = _Prepared(req, store, config, tasks=("superres",))
    scale = p.view.meta.scale
    if req.scale is not None and req.scale != scale:
        raise FieldError("scale", f"model {p.name!r} upscales x{scale}, not x{req.scale}")
    image = image_tensor(req.image, "image", None, p.view.output_shape[0])
    if max(image.shape[-2:]) > schemas.MAX_UPSCALE_INPUT:
        side = schemas.MAX_UPSCALE_INPUT
        raise FieldError("image", f"images to upscale must be at most {side} pixels on a side")

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, req.prompt, req.negative_prompt)
        return fn(model, image, scale=scale, noise_level=req.noise_level, callback=callback,
                  **cond, **p.sampling_kwargs())  # fmt: skip

    params = {"prompt": req.prompt, "negative": req.negative_prompt, "scale": scale,
              "noise_level": req.noise_level, **p.params}  # fmt: skip
    return Task("upscale", p.name, params, p.steps, run, [p.seed], preview=req.preview)


def interpolate(req: schemas.InterpolateRequest, store: ModelStore, config: ServerConfig) -> Task:
    with_images = req.image_a is not None
    fn = _pipeline(("interpolate",), "interpolate" if with_images else "walk", "interpolation")
    # between images: deterministic DDIM inversion, guidance 1 unless asked (as the CLI does)
    p = _Prepared(req, store, config, guidance=1.0 if with_images else None)
    if with_images and req.sampler not in (None, "ddim"):
        raise FieldError("sampler", "interpolation between images uses the ddim sampler")
    if not with_images and p.sampler in sampling.STOCHASTIC:
        raise FieldError("sampler", f"a walk needs a deterministic sampler, not {p.sampler!r}")
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
        kw = {
            "frames": req.frames,
            "steps": p.steps,
            "spacing": p.spacing or None,
            "guidance": p.guidance,
            "guidance_interval": p.guidance_interval,
            "callback": callback,
            **ends,
        }
        if with_images:
            return fn(model, *images, **kw)
        return fn(model, req.seed_a, req.seed_b, sampler=p.sampler, **kw)

    params = {"prompt_a": req.prompt_a, "prompt_b": req.prompt_b, "frames": req.frames, **p.params}
    if not with_images:
        params.update(seed_a=req.seed_a, seed_b=req.seed_b)
        del params["seed"]
    else:
        params["sampler"] = "ddim"
    return Task("interpolate", p.name, params, p.steps, run, preview=req.preview)


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
