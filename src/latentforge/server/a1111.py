"""AUTOMATIC1111's web UI API under /sdapi/v1, so A1111 clients (webuiapi, Krita and Photoshop
plugins, chat bots) work against `latentforge serve` unchanged.

Each call is synchronous, as A1111's are, but runs through latentforge's own bounded queue,
checks and limits (`dispatch`): a request is translated into latentforge's own request
(`schemas`), queued, and answered when its job ends. Errors are A1111's JSON
(`{"error", "detail", "body", "errors"}`, plus `field` naming A1111's field). Omitted fields
take the model's defaults, not A1111's (cfg 7, 512x512 would not suit most latentforge models).
docs/clients.md has the field and sampler tables.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import sampling
from ..errors import UserError
from ..io import a1111 as infotext
from ..io.embeddings import embedding_files
from ..io.images import with_a1111
from ..io.lora import lora_files
from ..schedules import SPACINGS
from . import dispatch, schemas
from .dispatch import Context, Refused
from .jobs import Job
from .store import BadModelName, ModelNotFound

PREFIX = "/sdapi/v1"
# latentforge field -> A1111 field, for error messages
RENAMES = {
    "sampler": "sampler_name",
    "guidance": "cfg_scale",
    "num": "batch_size",
    "spacing": "scheduler",
    "strength": "denoising_strength",
    "image": "init_images",
    "feather": "mask_blur",
    "model": "sd_model_checkpoint",
    "loras": "prompt",  # A1111 names LoRAs in the prompt (<lora:NAME:SCALE>)
    "controls": "alwayson_scripts",  # the sd-webui-controlnet extension's units
}
NAME = Annotated[str, Field(max_length=128)]


def error(
    status: int, message: Any, field: str | None = None, headers: dict | None = None
) -> Response:
    """An error as A1111's API words it (its `handle_exception`), `field` naming the field."""
    kind = {
        401: "Unauthorized",
        404: "NotFound",
        413: "PayloadTooLarge",
        422: "ValidationError",
        429: "TooManyRequests",
    }.get(status, "HTTPException")
    if isinstance(message, list) and message and field is None:  # a validation error
        loc = [str(x) for x in message[0].get("loc", ()) if x not in ("body", "query")]
        field = loc[0] if loc else None
    text = message if isinstance(message, str) else json.dumps(message)
    body = {"error": kind, "detail": message, "body": "", "errors": text, "field": field}
    return JSONResponse(body, status, headers)


class _Request(BaseModel):
    # A1111 clients send many fields latentforge has no use for (styles, restore_faces,
    # alwayson_scripts ...): ignored, as A1111 ignores what a script does not read
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: schemas.PromptText = Field("", max_length=2000)
    negative_prompt: schemas.PromptText = Field("", max_length=2000)
    seed: int = Field(-1, ge=-1, le=schemas.MAX_SEED, description="-1: random")
    sampler_name: NAME | None = None
    sampler_index: NAME | None = None  # A1111's older name for sampler_name
    scheduler: NAME | None = None
    batch_size: int = Field(1, ge=1, le=schemas.MAX_NUM)
    n_iter: int = Field(1, ge=1, le=schemas.MAX_NUM)
    steps: int | None = Field(None, ge=1, le=schemas.MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0, le=50)
    width: int | None = Field(None, ge=1, le=schemas.MAX_SIDE)
    height: int | None = Field(None, ge=1, le=schemas.MAX_SIDE)
    override_settings: dict[NAME, Any] = Field(default_factory=dict, max_length=64)
    alwayson_scripts: dict[NAME, Any] = Field(default_factory=dict, max_length=64)


class Txt2Img(_Request):
    pass


class Img2Img(_Request):
    init_images: list[schemas.Base64Image] = Field(min_length=1, max_length=8)
    mask: schemas.Base64Image | None = None
    denoising_strength: float = Field(0.75, ge=0, le=1)
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


class PngInfo(BaseModel):
    image: schemas.Base64Image


class Upscale(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    image: schemas.Base64Image
    upscaler_1: NAME | None = None


def _model_name(title: str | None) -> str | None:
    """A checkpoint title ("name [hash]", as A1111 lists them) -> the model's name."""
    return None if title in (None, "", "None") else str(title).split(" [")[0]


def _module(name: Any) -> str:
    """An sd-webui-controlnet preprocessor ("module") -> ours: canny, the scribble family,
    none; anything else is refused by name."""
    name = str(name or "none").lower()
    if name in ("none", "canny"):
        return name
    if name.startswith(("scribble", "sketch", "invert")):
        return "scribble"
    raise Refused(422, f"ControlNet module {name!r} is not available; use none, canny or "
                  "scribble", "alwayson_scripts")  # fmt: skip


def _controls(req: _Request, init_image: str | None = None) -> list[dict]:
    """The sd-webui-controlnet extension's `alwayson_scripts.controlnet.args` units -> our
    `controls`: input_image (or image, or the init image), module, model ("name [hash]"; none
    for the model's default), weight, guidance_start, guidance_end; disabled units skipped."""
    script = req.alwayson_scripts.get("controlnet") or req.alwayson_scripts.get("ControlNet")
    if not script:
        return []
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        raise Refused(422, "alwayson_scripts.controlnet.args must be a list of units",
                      "alwayson_scripts")  # fmt: skip
    units = []
    for unit in args:
        if unit.get("enabled", True) is False:
            continue
        image = unit.get("input_image") or unit.get("image") or init_image
        if isinstance(image, dict):  # newer versions: {"image": ..., "mask": ...}
            image = image.get("image")
        if not image:
            raise Refused(422, "a ControlNet unit needs input_image", "alwayson_scripts")
        units.append({
            "image": image, "controlnet": _model_name(unit.get("model")),
            "preprocess": _module(unit.get("module")),
            "scale": unit.get("weight", 1.0), "start": unit.get("guidance_start", 0.0),
            "end": unit.get("guidance_end", 1.0),
        })  # fmt: skip
    return units


def _settings(ctx: Context, req: _Request) -> dict[str, Any]:
    """latentforge request fields for an A1111 request's sampling fields."""
    num = req.batch_size * req.n_iter
    if num > schemas.MAX_NUM:
        raise Refused(422, f"batch_size x n_iter must be <= {schemas.MAX_NUM}", "batch_size")
    spacing = None
    if req.scheduler:
        try:
            spacing = infotext.spacing_from_a1111(req.scheduler)
        except UserError as e:
            raise Refused(422, str(e), "scheduler") from None
    checkpoint = req.override_settings.get("sd_model_checkpoint")
    try:  # A1111 takes LoRAs from the prompt's <lora:NAME:SCALE> tags, and drops the tags
        prompt, loras = infotext.extract_loras(req.prompt)
    except UserError as e:
        raise Refused(422, str(e), "prompt") from None
    return {
        "model": _model_name(checkpoint) or ctx.state.get("a1111_model"),
        "prompt": prompt,
        "loras": list(loras),
        "negative_prompt": req.negative_prompt,
        "sampler": req.sampler_name or req.sampler_index,
        "spacing": spacing,
        "steps": req.steps,
        "guidance": req.cfg_scale,
        "seed": None if req.seed == -1 else req.seed,
        "num": num,
    }


def _track(ctx: Context, job: Job) -> None:
    """Remember an A1111 job for /progress and /interrupt (finished ones are forgotten)."""
    jobs = ctx.state.setdefault("a1111_jobs", [])
    jobs[:] = [j for j in jobs if not j.finished] + [job]


def _current(ctx: Context) -> Job | None:
    """The A1111 job that runs now, else the next one waiting, else None."""
    jobs = [j for j in ctx.state.get("a1111_jobs", []) if not j.finished]
    return next((j for j in jobs if j.status == "running"), jobs[0] if jobs else None)


async def _run(ctx: Context, kind: str, req: _Request, ours: BaseModel) -> Response:
    """Queue `ours`, wait for it and answer as A1111 does: images, parameters, info."""
    job = await dispatch.submit(ctx, kind, ours)
    _track(ctx, job)
    await dispatch.finished(job)
    if job.status == "failed":
        return error(500, job.error or "the job failed")
    results = job.images  # cancelled (/interrupt): none
    params = [r["parameters"] for r in results]
    p = job.task.parameters
    sampler, scheduler = infotext.sampler_to_a1111(
        p["sampler"], p.get("spacing") or None, p.get("knobs")
    )
    seeds = [q["seed"] for q in params]
    name, digest = infotext.model_name_and_hash(params[0] if params else p)
    n = len(results)
    info = {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n,
        "seed": seeds[0] if seeds else p.get("seed"),
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": results[0]["width"] if results else None,
        "height": results[0]["height"] if results else None,
        "sampler_name": sampler,
        "scheduler": scheduler or "Automatic",
        "cfg_scale": p["guidance"],
        "steps": p["steps"],
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "denoising_strength": p.get("strength"),
        "sd_model_name": name,
        "sd_model_hash": digest,
        "index_of_first_image": 0,
        "infotexts": [infotext.format_parameters(q) for q in params],
        "styles": [],
        "extra_generation_params": {},
        "clip_skip": 1,
        "restore_faces": False,
        "interrupted": job.status == "cancelled",
        "job_timestamp": "",
    }
    body = {
        "images": [r["png"] for r in results],
        "parameters": req.model_dump(),
        "info": json.dumps(info),
    }
    return JSONResponse(body)


def make_router(ctx: Context) -> APIRouter:
    """The /sdapi/v1 routes over `ctx`."""
    r = APIRouter(prefix=PREFIX, tags=["a1111"])
    store = ctx.store

    async def refused(call) -> Response:
        try:
            return await call
        except Refused as e:
            return error(e.status, str(e), RENAMES.get(e.field, e.field), e.headers)

    @r.post("/txt2img")
    async def txt2img(req: Txt2Img) -> Response:
        async def go():
            fields = _settings(ctx, req)
            ours = dispatch.build(
                schemas.Txt2ImgRequest, RENAMES, width=req.width, height=req.height,
                controls=_controls(req), **fields,
            )  # fmt: skip
            return await _run(ctx, "txt2img", req, ours)

        return await refused(go())

    @r.post("/img2img")
    async def img2img(req: Img2Img) -> Response:
        async def go():
            fields = _settings(ctx, req)
            image = req.init_images[0]
            fields["controls"] = _controls(req, image)
            if req.mask is None:
                ours = dispatch.build(
                    schemas.Img2ImgRequest,
                    RENAMES,
                    image=image,
                    strength=req.denoising_strength,
                    **fields,
                )
                return await _run(ctx, "img2img", req, ours)
            if req.inpainting_mask_invert:
                raise Refused(
                    422,
                    "inpainting_mask_invert is not supported: send the "
                    "mask inverted (white = redraw)",
                    "inpainting_mask_invert",
                )
            ours = dispatch.build(
                schemas.InpaintRequest,
                RENAMES,
                image=image,
                mask=req.mask,
                strength=req.denoising_strength,
                feather=min(req.mask_blur, 16),
                **fields,
            )
            return await _run(ctx, "inpaint", req, ours)

        return await refused(go())

    @r.post("/extra-single-image")
    async def extra_single_image(req: Upscale) -> Response:
        async def go():
            model = None if req.upscaler_1 in (None, "None") else req.upscaler_1
            ours = dispatch.build(schemas.UpscaleRequest, RENAMES, model=model, image=req.image)
            job = await dispatch.submit(ctx, "upscale", ours)
            await dispatch.finished(job)
            if job.status != "done":
                return error(500, job.error or f"the job was {job.status}")
            return JSONResponse({"html_info": "", "image": job.images[0]["png"]})

        return await refused(go())

    @r.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict:
        job = _current(ctx)
        if job is None:
            state = {
                "skipped": False,
                "interrupted": False,
                "job": "",
                "job_count": 0,
                "job_timestamp": "",
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": 0,
            }
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": state,
                "current_image": None,
                "textinfo": None,
            }
        _, _, event = job.progress()
        done = event["progress"]
        started = job.timings.get("queued_s")
        eta = 0.0
        if started is not None and done > 0:
            elapsed = max(0.0, time.monotonic() - job.created - started)
            eta = elapsed / done - elapsed
        waiting = sum(not j.finished for j in ctx.state.get("a1111_jobs", []))
        state = {
            "skipped": False,
            "interrupted": event["cancel_requested"],
            "job": job.id,
            "job_count": waiting,
            "job_timestamp": "",
            "job_no": 0,
            "sampling_step": event["step"],
            "sampling_steps": event["total"],
        }
        image = None if skip_current_image else event["preview"]
        return {
            "progress": done,
            "eta_relative": eta,
            "state": state,
            "current_image": image,
            "textinfo": None,
        }

    @r.post("/interrupt")
    @r.post("/skip")  # latentforge cannot skip one image of a batch: it stops the job
    async def interrupt() -> dict:
        job = _current(ctx)
        if job is not None:
            ctx.queue.cancel(job.id)
        return {}

    @r.get("/samplers")
    async def samplers() -> list[dict]:
        out = [
            {"name": name, "aliases": [ours], "options": {k: str(v) for k, v in knobs.items()}}
            for name, (ours, knobs) in infotext.SAMPLERS.items()
            if ours in sampling.SAMPLERS
        ]
        named = {ours for ours, _ in infotext.SAMPLERS.values()}
        out += [
            {"name": s, "aliases": [s], "options": {}}
            for s in sorted(sampling.SAMPLERS)
            if s not in named
        ]
        return out

    @r.get("/schedulers")
    async def schedulers() -> list[dict]:
        def entry(name: str, label: str) -> dict:
            return {
                "name": name,
                "label": label,
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            }

        out = [entry(k.lower().replace(" ", "_"), k) for k in infotext.SCHEDULERS]
        named = set(infotext.SCHEDULERS.values())
        return out + [entry(s, s) for s in SPACINGS if s not in named]

    @r.get("/sd-models")
    def sd_models() -> list[dict]:
        """The models that draw images (super-resolution ones are /upscalers)."""
        return [
            {
                "title": name,
                "model_name": name,
                "hash": None,
                "sha256": None,
                "filename": name,
                "config": None,
            }
            for name, view in store.entries()
            if not isinstance(view, str) and view.task != "superres"
        ]

    def current_model() -> str | None:
        name = ctx.state.get("a1111_model")
        if name is None:
            try:
                name = store.default_name
            except UserError:
                return None
        return name

    @r.get("/options")
    async def get_options() -> dict:
        return {
            "sd_model_checkpoint": current_model(),
            "sd_checkpoint_hash": None,
            "samples_format": "png",
        }

    @r.post("/options")
    def set_options(options: dict[NAME, Any]) -> Response:
        """Only `sd_model_checkpoint` is used (the A1111 dialect's model); the rest ignored."""
        name = _model_name(options.get("sd_model_checkpoint"))
        if name is not None:
            try:
                name, _ = store.view(name)
            except ModelNotFound as e:
                return error(404, str(e), "sd_model_checkpoint")
            except (BadModelName, UserError) as e:
                return error(400, str(e), "sd_model_checkpoint")
            ctx.state["a1111_model"] = name
        return JSONResponse(None)

    @r.post("/png-info")
    def png_info(req: PngInfo) -> Response:
        """A PNG's A1111 parameters (written by A1111, or made from latentforge's own chunks),
        parsed, its other chunks, and the settings latentforge reads from it (`latentforge`)."""
        try:
            img = ctx.decoder.open(req.image, "image")
        except dispatch.tasks.ImageTooLarge as e:
            return error(413, str(e), "image")
        except UserError as e:
            return error(400, str(e), "image")
        chunks = {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}
        text = chunks.get("parameters") or infotext.format_parameters(chunks) or ""
        try:
            ours = with_a1111({**chunks, "parameters": text}) if text else {}
        except UserError as e:
            ours = {"error": str(e)}
        items = {k: v for k, v in chunks.items() if k != "parameters"}
        return JSONResponse(
            {
                "info": text,
                "items": items,
                "parameters": infotext.parse_parameters(text) if text else {},
                "latentforge": ours,
            }
        )

    @r.get("/upscalers")
    def upscalers() -> list[dict]:
        out = [
            {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}
        ]
        for name, view in store.entries():
            if not isinstance(view, str) and view.task == "superres":
                out.append(
                    {
                        "name": name,
                        "model_name": name,
                        "model_path": None,
                        "model_url": None,
                        "scale": view.meta.scale,
                    }
                )
        return out

    @r.get("/loras")
    def loras() -> list[dict]:
        return [
            {"name": n, "alias": n, "path": f.name, "metadata": {}}
            for n, f in lora_files(ctx.config.loras_folder()).items()
        ]

    @r.get("/embeddings")
    def embeddings() -> dict:
        empty = {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": None,
            "vectors": None,
        }
        return {
            "loaded": {f.stem: empty for f in embedding_files(ctx.config.embeddings_folder())},
            "skipped": {},
        }

    @r.get("/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    return r
