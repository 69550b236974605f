"""API requests -> jobs: check them against the model, decode input images, wrap the pipelines.

Everything a request can get wrong is found here, before the job is queued, cheapest first: the
model name (400/404), a field (422 naming it: the request's settings are resolved and validated
by `SampleSettings.resolve` against the model's defaults), the job's size against the server's
work budget (422 naming `steps`), then the images: their size from the header (413) before any
pixel is decompressed, then their pixels (400), at most `max_decodes` at a time. The `runner`
then loads the model once, samples with a callback that reports progress and live previews (and
stops a job past `job_timeout`), and encodes the results as PNGs whose text chunks hold their
parameters (`latentforge generate --from-png` reads them back).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from .. import sampling
from ..errors import UserError
from ..io.embeddings import Embedding, add_embeddings, embedding_files, used_embeddings
from ..io.images import from_pil, make_grid, png_info, to_pil
from ..io.lora import AppliedLoras, LoraFileCache, LoraSpec, apply_loras, lora_files, remove_loras
from ..io.model_folder import LoadedModel, ModelFolder
from ..pipelines import generate as p_generate
from ..pipelines import img2img as p_img2img
from ..pipelines import inpaint as p_inpaint
from ..pipelines import interpolate as p_interpolate
from ..pipelines import superres as p_superres
from ..pipelines.common import describe_conditioning, labels_from_prompt
from ..pipelines.control import ControlRequest
from ..pipelines.settings import SampleSettings, SettingsError
from . import schemas
from .config import ServerConfig
from .jobs import Job, JobCancelled, Task
from .store import BrokenModel, ModelStore

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
PROMPTS = ("prompt", "negative", "prompt_a", "prompt_b")  # job parameters holding prompt text
PREVIEW_COST_RATIO = 20  # a preview that took c seconds waits >= 20 c for the next one


class BadImage(UserError):
    """An input image that is not base64 or not a readable image (HTTP 400)."""


class ImageTooLarge(BadImage):
    """An input image over the server's size limits, read from its header (HTTP 413)."""


class FieldError(UserError):
    """A request field the model or the server's limits reject (HTTP 422 naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class JobTimeout(UserError):
    """A job that ran past the server's `job_timeout` (it ends failed with this message)."""


# ----- images in and out -----------------------------------------------------------------------
class ImageDecoder:
    """Request images -> tensors. `open` reads only the header (PIL decompresses nothing before
    `load`), so an image over `max_pixels` is refused before it costs memory; `tensor` decodes
    at most `slots` images at a time (a decode costs about 30 bytes a pixel at its peak)."""

    def __init__(self, max_pixels: int, slots: int):
        self.max_pixels = max_pixels
        self._slots = threading.BoundedSemaphore(slots)

    @classmethod
    def for_config(cls, config: ServerConfig) -> ImageDecoder:
        return cls(config.max_image_pixels, config.max_decodes)

    def open(self, data: str, field: str) -> Image.Image:
        """base64 (or a data: URL) -> a PIL image, its header read and its size checked."""
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadImage(f"{field}: not valid base64") from None
        limit = f"this server's limit of {self.max_pixels} pixels (max_image_pixels)"
        try:
            img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:  # PIL's own limit, far above ours
            raise ImageTooLarge(f"{field}: image over {limit}") from None
        except Exception as e:  # PIL raises many types on corrupt data (OSError, SyntaxError...)
            kind = type(e).__name__
            raise BadImage(f"{field}: not a readable PNG/JPEG/WebP image ({kind})") from None
        w, h = img.size
        if w * h > self.max_pixels:
            raise ImageTooLarge(f"{field}: a {w}x{h} image ({w * h} pixels) is over {limit}")
        if max(w, h) > schemas.MAX_SIDE:
            side = schemas.MAX_SIDE
            raise ImageTooLarge(f"{field}: a {w}x{h} image is over {side} pixels on a side")
        return img

    def tensor(
        self, img: Image.Image, field: str, shape: tuple[int, ...] | None, channels: int
    ) -> torch.Tensor:
        """An opened image -> (1, C, H, W) in [-1, 1], resized (bicubic) to shape (C, H, W) if
        given; BadImage naming the field when its pixels do not decode."""
        with self._slots:
            try:
                img.load()
            except Exception as e:
                kind = type(e).__name__
                raise BadImage(f"{field}: not a readable PNG/JPEG/WebP image ({kind})") from None
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent = black
                img = Image.alpha_composite(background, img.convert("RGBA"))
            x = from_pil(img, channels)[None]
            if shape is not None and tuple(x.shape[-2:]) != tuple(shape[1:]):
                x = F.interpolate(x, size=tuple(shape[1:]), mode="bicubic", antialias=True)
                x = x.clamp(-1, 1)
            return x

    def image(
        self, data: str, field: str, shape: tuple[int, ...] | None, channels: int
    ) -> torch.Tensor:
        """A base64 image -> (1, C, H, W) in [-1, 1] (`open`, then `tensor`)."""
        return self.tensor(self.open(data, field), field, shape, channels)

    def mask(self, img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """An opened mask (white = regenerate) -> (1, 1, H, W) in {0, 1}, resized nearest."""
        m = (self.tensor(img, "mask", None, 1) + 1) / 2
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=tuple(size), mode="nearest")
        return (m > 0.5).float()


def png_base64(image: torch.Tensor, metadata: dict | None = None, compress_level: int = 6) -> str:
    """(C, H, W) in [-1, 1] -> base64 PNG with `metadata` as text chunks, A1111's `parameters`
    beside them (as io.images.save_png)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", pnginfo=png_info(metadata), compress_level=compress_level)
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
    try:
        name, view = store.view(name)
    except BrokenModel as e:
        raise FieldError("model", str(e)) from None
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
        self.config = config
        self.name, self.view = _pick_model(store, req.model, tasks)
        num = getattr(req, "num", 1)
        if num > config.max_num:
            raise FieldError("num", f"num must be <= {config.max_num} on this server")
        steps = req.steps
        if steps is not None and steps > config.max_steps:
            raise FieldError("steps", f"steps must be <= {config.max_steps} on this server")
        if steps is None and self.view.defaults.steps > config.max_steps:
            steps = config.max_steps  # the model's default, capped to the server's limit
        self.loras = lora_specs(getattr(req, "loras", ()), config)
        settings = SampleSettings.build(
            sampler=req.sampler, steps=steps, spacing=req.spacing,
            guidance=req.guidance if req.guidance is not None else guidance,
            guidance_interval=req.guidance_interval, knobs=req.knobs, num=num,
            seed=random.randrange(2**31) if req.seed is None else req.seed,
            negative=getattr(req, "negative_prompt", ""),
            loras=[spec.label for spec in self.loras], **fields,
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
            **({"loras": list(s.loras)} if s.loras else {}),
        }  # fmt: skip

    @property
    def seeds(self) -> list[int]:
        return [self.settings.seed + i for i in range(self.settings.num)]

    def check_work(self, steps: int, runs: int, size: tuple[int, int], what: str) -> None:
        """The job's size, `steps` x `runs` samples of `size` (h, w) denoiser pixels, within the
        server's budget (`max_job_work`); else a FieldError naming steps."""
        work = steps * runs * size[0] * size[1]
        budget = self.config.max_job_work
        if work > budget:
            shape = f"{runs} {what} of {size[1]}x{size[0]}"
            raise FieldError(
                "steps",
                f"this job is {work:,} pixel-steps ({steps} steps x {shape} denoiser pixels), "
                f"over this server's budget of {budget:,} (max_job_work): ask for fewer steps, "
                "images or pixels",
            )

    def check_model_size(self, steps: int, runs: int, what: str = "images") -> None:
        """`check_work` for `runs` samples at the model's own size."""
        self.check_work(steps, runs, tuple(self.view.image_shape[1:]), what)


def lora_specs(names: list[str] | tuple[str, ...], config: ServerConfig) -> list[LoraSpec]:
    """A request's LoRAs ('NAME[:SCALE]') -> files of the server's loras folder: looked up by
    name in its listing, never a path the client chooses (a FieldError naming the others)."""
    if not names:
        return []
    available = lora_files(config.loras_folder())
    specs = []
    for text in names:
        try:
            spec = LoraSpec.parse(text)
        except UserError as e:
            raise FieldError("loras", str(e)) from None
        name = str(spec.path)
        if name not in available or any(c in name for c in "/\\") or ".." in name:
            choices = ", ".join(available) or "none: this server has no loras folder"
            raise FieldError("loras", f"unknown LoRA {name!r}; choose one of {choices}")
        specs.append(LoraSpec(available[name], spec.scale))
    return specs


def control_request(
    req, name: str, view: ModelFolder, config: ServerConfig, images: ImageDecoder
) -> tuple[ControlRequest | None, list[dict]]:
    """A request's `controls` -> (a ControlRequest, their records for the job's parameters),
    checked before the job is queued: ControlNets by name from the server's controlnets
    folder, never a path the client chooses (or the model's default), each fitting the model;
    images header-checked and decoded. (None, []) for no controls."""
    from ..io.checkpoint import MODEL_WEIGHTS, file_digest
    from ..io.controlnet import controlnet_config, controlnet_folders, default_controlnet
    from ..io.model_folder import read_model_meta
    from ..pipelines.control import check_fit, image_digest

    units = getattr(req, "controls", None) or []
    if not units:
        return None, []
    available = controlnet_folders(config.controlnets_folder())
    folders, records, pictures = [], [], []
    for i, unit in enumerate(units):
        if unit.controlnet is None:
            folder = default_controlnet(view.path, view.meta) if view.path else None
            if folder is None:
                raise FieldError("controls", f"controls[{i}]: no controlnet named, and model "
                                 f"{name!r} names no default ControlNet")  # fmt: skip
        elif unit.controlnet in available:
            folder = available[unit.controlnet]
        else:
            choices = ", ".join(available) or "none: this server has no controlnets folder"
            raise FieldError("controls", f"unknown ControlNet {unit.controlnet!r}; choose one "
                             f"of {choices}")  # fmt: skip
        try:
            meta = read_model_meta(folder)
            if meta.kind != "controlnet":
                raise UserError(f"{folder.name} is not a ControlNet")
            check_fit(view, controlnet_config(meta), f"ControlNet {folder.name!r}")
        except UserError as e:
            raise FieldError("controls", f"controls[{i}]: {e}") from None
        picture = to_pil(images.image(unit.image, f"controls[{i}].image", None, 3)[0])
        folders.append(folder)
        pictures.append(picture)
        records.append({
            "controlnet": folder.name, "sha256": file_digest(folder / MODEL_WEIGHTS),
            "image": image_digest(picture),
            "preprocess": unit.preprocess or meta.controlnet.get("preprocess", "none"),
            "scale": unit.scale, "start": unit.start, "end": unit.end,
            "guess_mode": unit.guess_mode,
        })  # fmt: skip
    request = ControlRequest(
        tuple(pictures), tuple(folders), scales=tuple(u.scale for u in units),
        starts=tuple(u.start for u in units), ends=tuple(u.end for u in units),
        preprocess=tuple(r["preprocess"] for r in records),
        guess_mode=tuple(u.guess_mode for u in units),
    )  # fmt: skip
    return request, records


def _controls(model: LoadedModel, request: ControlRequest | None) -> list:
    """The request's ControlNets loaded for `model` (none for no request)."""
    return [] if request is None else request.build(model, option="controls")[0]


def _conditioning(model: ModelFolder, prompt: str) -> dict:
    """generate's labels / prompts for a request's prompt (the negative is in the settings)."""
    return describe_conditioning(model, prompt)[0]


def txt2img(
    req: schemas.Txt2ImgRequest, store: ModelStore, config: ServerConfig, images: ImageDecoder
) -> Task:
    p = _Prepared(req, store, config, layout=req.layout, bf16=req.bf16, width=req.width,
                  height=req.height, vae_tiling=req.vae_tiling)  # fmt: skip
    p.check_work(p.settings.steps, p.settings.num, p.settings.latent_size(p.view), "images")
    prompt = req.prompt  # the closures keep fields, never the request (it may hold images)
    control, records = control_request(req, p.name, p.view, config, images)

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, prompt)
        return p_generate.generate(model, p.settings, **cond, callback=callback,
                                   controls=_controls(model, control))  # fmt: skip

    # stored resolved, so `generate --from-png` reproduces the image whatever the default
    params = {"prompt": req.prompt, "negative": req.negative_prompt, "num": req.num,
              "layout": p.settings.layout, "precision": p.settings.precision,
              "width": p.settings.width, "height": p.settings.height,
              "vae_tiling": p.settings.vae_tiling, **p.params}  # fmt: skip
    if records:
        params["controlnets"] = records
    return Task("txt2img", p.name, params, p.settings.steps, run, p.seeds, preview=req.preview,
                loras=p.loras)  # fmt: skip


def img2img(
    req: schemas.Img2ImgRequest, store: ModelStore, config: ServerConfig, images: ImageDecoder
) -> Task:
    p = _Prepared(req, store, config)
    total = max(1, round(req.strength * p.settings.steps))
    p.check_model_size(total, p.settings.num)
    shape = p.view.output_shape
    image = images.image(req.image, "image", shape, shape[0])
    prompt, strength = req.prompt, req.strength
    control, records = control_request(req, p.name, p.view, config, images)

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, prompt)
        return p_img2img.img2img(model, image, p.settings, strength=strength, callback=callback,
                                 controls=_controls(model, control), **cond)  # fmt: skip

    params = {
        "prompt": req.prompt,
        "negative": req.negative_prompt,
        "num": req.num,
        "strength": req.strength,
        **p.params,
        **({"controlnets": records} if records else {}),
    }
    return Task("img2img", p.name, params, total, run, p.seeds, preview=req.preview, loras=p.loras)


def inpaint(
    req: schemas.InpaintRequest, store: ModelStore, config: ServerConfig, images: ImageDecoder
) -> Task:
    p = _Prepared(req, store, config, tasks=("generate", "inpaint"))
    total = max(1, round(req.strength * p.settings.steps))
    p.check_model_size(total * req.resample, p.settings.num)  # RePaint redoes each segment
    shape = p.view.output_shape
    # both headers are checked before either image is decoded
    opened, opened_mask = images.open(req.image, "image"), images.open(req.mask, "mask")
    image = images.tensor(opened, "image", shape, shape[0])
    mask = images.mask(opened_mask, shape[1:])
    extra = {
        "strength": req.strength,
        "resample": req.resample,
        "jump": req.jump,
        "feather": req.feather,
    }
    prompt = req.prompt
    control, records = control_request(req, p.name, p.view, config, images)

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, prompt)
        return p_inpaint.inpaint(model, image, mask, p.settings, callback=callback, **extra,
                                 controls=_controls(model, control), **cond)  # fmt: skip

    params = {
        "prompt": req.prompt,
        "negative": req.negative_prompt,
        "num": req.num,
        **extra,
        **p.params,
        **({"controlnets": records} if records else {}),
    }
    return Task("inpaint", p.name, params, total, run, p.seeds, preview=req.preview, loras=p.loras)


def upscale(
    req: schemas.UpscaleRequest, store: ModelStore, config: ServerConfig, images: ImageDecoder
) -> Task:
    p = _Prepared(req, store, config, tasks=("superres",))
    scale = p.view.meta.scale
    if req.scale is not None and req.scale != scale:
        raise FieldError("scale", f"model {p.name!r} upscales x{scale}, not x{req.scale}")
    opened = images.open(req.image, "image")
    if max(opened.size) > schemas.MAX_UPSCALE_INPUT:
        side = schemas.MAX_UPSCALE_INPUT
        raise FieldError("image", f"images to upscale must be at most {side} pixels on a side")
    try:
        *_, tile, _, starts = p_superres.tile_grid(p.view, opened.height, opened.width)
    except UserError as e:
        raise FieldError("image", str(e)) from None
    p.check_work(p.settings.steps, len(starts), tile, "tiles")
    image = images.tensor(opened, "image", None, p.view.output_shape[0])
    prompt, noise_level = req.prompt, req.noise_level

    def run(model: LoadedModel, callback) -> torch.Tensor:
        cond = _conditioning(model, prompt)
        return p_superres.upscale(
            model, image, p.settings, scale=scale, noise_level=noise_level,
            callback=callback, **cond,
        )  # fmt: skip

    params = {"prompt": req.prompt, "negative": req.negative_prompt, "scale": scale,
              "noise_level": req.noise_level, **p.params}  # fmt: skip
    return Task("upscale", p.name, params, p.settings.steps, run, p.seeds[:1], preview=req.preview)


def interpolate(
    req: schemas.InterpolateRequest, store: ModelStore, config: ServerConfig, images: ImageDecoder
) -> Task:
    with_images = req.image_a is not None
    # between images: deterministic DDIM inversion, guidance 1 unless asked (as the CLI does)
    p = _Prepared(req, store, config, guidance=1.0 if with_images else None)
    if with_images and req.sampler not in (None, "ddim"):
        raise FieldError("sampler", "interpolation between images uses the ddim sampler")
    if not with_images and p.settings.sampler in sampling.STOCHASTIC:
        raise FieldError(
            "sampler", f"a walk needs a deterministic sampler, not {p.settings.sampler!r}"
        )
    # the frames, and with images the two inversions before them
    p.check_model_size(p.settings.steps, req.frames + 2 * with_images, "frames")
    shape = p.view.output_shape
    ends = []
    if with_images:
        fields = ("image_a", "image_b")
        opened = [images.open(getattr(req, f), f) for f in fields]  # both headers first
        ends = [images.tensor(im, f, shape, shape[0]) for im, f in zip(opened, fields, strict=True)]
    prompts = {"a": req.prompt_a, "b": req.prompt_b}
    frames, seeds = req.frames, (req.seed_a, req.seed_b)

    def run(model: LoadedModel, callback) -> torch.Tensor:
        conds = {}
        for side, prompt in prompts.items():
            label = labels_from_prompt(prompt, model.class_names) if model.num_classes else None
            conds[f"labels_{side}"] = label
            conds[f"prompts_{side}"] = "" if model.num_classes else prompt
        kw = {"frames": frames, "callback": callback, **conds}
        if with_images:
            return p_interpolate.interpolate(model, *ends, p.settings, **kw)
        return p_interpolate.walk(model, *seeds, p.settings, **kw)

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


class _ModelState:
    def __init__(self, embeddings: list[Embedding]):
        self.embeddings = embeddings
        self.loras: tuple[LoraSpec, ...] = ()  # fused now
        self.applied: AppliedLoras | None = None
        self.users = 0  # jobs running with those LoRAs


class ModelAdapters:
    """Adapters on the server's loaded models. Embeddings: every file of the embeddings folder,
    added to a model's text encoder when the model is first used (as A1111 loads its folder; one
    that does not fit the model is skipped). LoRAs: a job's files (read through one cache)
    fused into the shared model for that job and restored bit for bit when the last job using
    them ends; a job that needs other LoRAs waits for those jobs (`workers` > 1)."""

    def __init__(self, config: ServerConfig):
        self.folder = config.embeddings_folder()
        self.cache = LoraFileCache()
        self._cond = threading.Condition()
        self._models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> state

    def _state(self, model: LoadedModel) -> _ModelState:
        """The model's state, its embeddings added on first use (call with _cond held)."""
        state = self._models.get(model.denoiser)
        if state is None:
            files = [(f, None) for f in embedding_files(self.folder)]
            state = self._models[model.denoiser] = _ModelState(
                add_embeddings(model, files, skip=True)
            )
        return state

    def embeddings(self, model: LoadedModel) -> list[Embedding]:
        with self._cond:
            return self._state(model).embeddings

    @contextlib.contextmanager
    def loras(self, model: LoadedModel, specs: list[LoraSpec]) -> Iterator[None]:
        """`specs` fused into `model` while the block runs."""
        want = tuple(specs)
        with self._cond:
            state = self._state(model)
            while state.loras != want and state.users:
                self._cond.wait()
            if state.loras != want:  # the model is plain here: no job uses other LoRAs
                if want:  # every file is read and checked before any weight changes
                    state.applied = apply_loras(model, want, cache=self.cache)
                state.loras = want
            state.users += 1
        try:
            yield
        finally:
            with self._cond:
                state.users -= 1
                if not state.users and state.applied is not None:
                    remove_loras(model, state.applied)
                    state.applied, state.loras = None, ()
                self._cond.notify_all()


def make_runner(store: ModelStore, config: ServerConfig) -> Callable[[Job], list[dict]]:
    limit = math.inf if config.job_timeout is None else config.job_timeout
    adapters = ModelAdapters(config)

    def runner(job: Job) -> list[dict]:
        task, t = job.task, job.timings
        start = time.monotonic()
        deadline = start + limit
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
            if now > deadline:
                raise JobTimeout(
                    f"the job ran past this server's limit of {limit:g} s (job_timeout) at step "
                    f"{step} of {task.total}: ask for fewer steps, images or pixels"
                )
            if now >= next_preview and step < task.total:
                preview = preview_base64(model, denoised)
                cost = time.monotonic() - now
                preview_s += cost
                next_preview = now + max(config.preview_interval, PREVIEW_COST_RATIO * cost)
            job.report(step, preview)

        start = time.monotonic()
        with adapters.loras(model, task.loras):
            t["lora_s"] = time.monotonic() - start
            images = task.run(model, callback)
        t["sample_s"] = time.monotonic() - start - t["lora_s"] - preview_s
        embeddings = used_embeddings(
            adapters.embeddings(model), *(str(task.parameters.get(k) or "") for k in PROMPTS)
        )
        t["preview_s"] = preview_s
        if not all(bool(torch.isfinite(image).all()) for image in images):
            raise UserError(
                "the sampler diverged: the result holds NaN or infinite values (try other "
                "knobs, another sampler or fewer steps)"
            )
        start = time.monotonic()
        results = []
        for i, image in enumerate(images):
            meta = {**task.parameters, "model_sha256": model.sha256, "kind": task.kind}
            if embeddings:
                meta["embeddings"] = embeddings
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
