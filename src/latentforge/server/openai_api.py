"""OpenAI's images API: `POST /v1/images/generations | edits | variations` and the model list,
so the official `openai` client, Open WebUI and apps with a configurable base URL work against
`latentforge serve`.

Every call is synchronous, as OpenAI's are, and runs through latentforge's bounded queue,
checks and limits (`dispatch`). Errors are OpenAI's JSON, `{"error": {"message", "type",
"param", "code"}}`, a field latentforge rejects (its 422) a 400 as OpenAI gives. The same
routes also answer under /openai/v1, where `GET /openai/v1/models` is OpenAI's list; plain
`GET /v1/models` stays latentforge's own list except for the official OpenAI SDKs (their
`X-Stainless-Lang` header or `OpenAI/` user agent), which get OpenAI's. `response_format=url`
gives URLs on this server (`/files/{job}/{i}.png`, unguessable, kept as long as the job's
result). docs/clients.md has the field table.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections import OrderedDict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from ..errors import UserError
from . import dispatch, schemas
from .dispatch import Context, Refused
from .jobs import Job

PREFIXES = ("/v1/images/", "/openai/")
VARIATION_STRENGTH = 0.6  # how far a variation moves from its image (img2img strength)
# model names OpenAI apps send by default: the server's default model
OPENAI_MODELS = re.compile(r"(dall-e|gpt-image)[\w.-]*")
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
MAX_FILES = 64  # URLs kept (each one a finished job's image, while the queue keeps it)
ERROR_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
}
ERROR_CODES = {
    401: "invalid_api_key",
    404: "model_not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
}
RENAMES = {"num": "n", "width": "size", "height": "size", "guidance": "guidance"}
NAME = Annotated[str, Field(max_length=128)]


def serves(path: str) -> bool:
    """Whether `path` belongs to this dialect (its errors are OpenAI's)."""
    return path.startswith(PREFIXES)


def wants_openai(request: Request) -> bool:
    """Whether a `GET /v1/models` comes from an official OpenAI SDK (OpenAI's list then)."""
    agent = request.headers.get("user-agent", "").lower()
    return "x-stainless-lang" in request.headers or agent.startswith("openai/")


def error(
    status: int, message: Any, field: str | None = None, headers: dict | None = None
) -> Response:
    """An error as OpenAI words it; latentforge's 422 (a field) is OpenAI's 400."""
    if not isinstance(message, str):  # a validation error list: its first message
        first = message[0] if isinstance(message, list) and message else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query")]
        field = field or (loc[0] if loc else None)
        message = f"{field}: {first.get('msg', '')}" if field else str(first.get("msg", message))
    status = 400 if status == 422 else status
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": field,
            "code": ERROR_CODES.get(status),
        }
    }
    return JSONResponse(body, status, headers)


def models_list(names: list[str]) -> dict:
    """`GET /v1/models` in OpenAI's shape."""
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "latentforge"} for n in names]
    return {"object": "list", "data": data}


class Generation(BaseModel):
    # fields OpenAI defines that do not apply (quality, style, user, background, moderation,
    # output_format ...) are ignored, as docs/clients.md lists
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: schemas.PromptText = Field(min_length=1, max_length=2000)
    model: NAME | None = None
    n: int = Field(1, ge=1, le=schemas.MAX_NUM)
    size: NAME | None = None
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = Field(None, ge=0, le=schemas.MAX_SEED, description="latentforge's own")
    steps: int | None = Field(None, ge=1, le=schemas.MAX_STEPS, description="latentforge's own")


def _model(name: str | None) -> str | None:
    """The latentforge model for an OpenAI model name (OpenAI's own names: the default)."""
    return None if name is None or OPENAI_MODELS.fullmatch(name) else name


def _size(size: str | None) -> dict[str, int | None]:
    if size in (None, "", "auto"):
        return {"width": None, "height": None}
    m = _SIZE.fullmatch(size)
    if m is None:
        raise Refused(
            400, f"size must be WIDTHxHEIGHT (e.g. 256x256) or auto, got {size!r}", "size"
        )
    return {"width": int(m[1]), "height": int(m[2])}


def _form_int(form, name: str, default: int) -> int:
    value = form.get(name)
    if value in (None, ""):
        return default
    if not isinstance(value, str) or not value.isdigit():
        raise Refused(400, f"{name} must be an integer", name)
    return int(value)


async def _file(form, *names: str, required: bool = True) -> str | None:
    """The first upload among `names` as base64 (the decoder checks its size and format)."""
    for name in names:
        upload = form.get(name)
        if isinstance(upload, UploadFile):
            return base64.b64encode(await upload.read()).decode("ascii")
        if upload is not None:
            raise Refused(400, f"{name} must be a file upload", names[0])
    if required:
        raise Refused(400, f"{names[0]} is required (a PNG file)", names[0])
    return None


def _alpha_mask(ctx: Context, data: str, field: str) -> str:
    """OpenAI's mask (transparent = edit) -> latentforge's (white = redraw), base64 PNG."""
    img = ctx.decoder.open(data, field)  # header and size checked before any pixel
    try:
        img.load()
    except Exception as e:
        kind = type(e).__name__
        raise dispatch.tasks.BadImage(f"{field}: not a readable image ({kind})") from None
    if "A" not in img.getbands() and "transparency" not in img.info:
        raise Refused(
            400,
            f"{field} must have transparency (an alpha channel): its fully "
            "transparent pixels are the ones to edit",
            field,
        )
    alpha = img.convert("RGBA").getchannel("A")
    buf = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def make_router(ctx: Context, prefix: str = "") -> APIRouter:
    """The images routes (under `prefix`; with one, also OpenAI's `GET {prefix}/v1/models`)."""
    r = APIRouter(prefix=prefix, tags=["openai"])
    files: OrderedDict[str, None] = ctx.state.setdefault("openai_files", OrderedDict())

    async def answer(
        kind: str, ours: BaseModel, response_format: str | None, request: Request
    ) -> Response:
        if response_format not in (None, "b64_json", "url"):
            raise Refused(400, "response_format must be b64_json or url", "response_format")
        job = await dispatch.submit(ctx, kind, ours)
        await dispatch.finished(job)
        if job.status != "done":
            return error(500 if job.status == "failed" else 503, job.error or f"job {job.status}")
        return JSONResponse(_images(job, response_format or "url", request, files))

    async def refused(call) -> Response:
        try:
            return await call
        except Refused as e:
            return error(e.status, str(e), RENAMES.get(e.field, e.field), e.headers)
        except UserError as e:  # an image the decoder refused while reading a mask
            status = 413 if isinstance(e, dispatch.tasks.ImageTooLarge) else 400
            return error(status, str(e))

    @r.post("/v1/images/generations")
    async def generations(req: Generation, request: Request) -> Response:
        async def go():
            ours = dispatch.build(
                schemas.Txt2ImgRequest,
                RENAMES,
                model=_model(req.model),
                prompt=req.prompt,
                num=req.n,
                seed=req.seed,
                steps=req.steps,
                **_size(req.size),
            )
            return await answer("txt2img", ours, req.response_format, request)

        return await refused(go())

    @r.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        """multipart: image (transparent = edit when no mask), mask, prompt, n, model,
        response_format; size is ignored (the model's own size)."""

        async def go():
            form = await _form(request)
            if not form.get("prompt"):
                raise Refused(400, "prompt is required", "prompt")
            image = await _file(form, "image", "image[]")
            mask = await _file(form, "mask", required=False)
            mask = await asyncio.to_thread(_alpha_mask, ctx, mask or image, "mask")
            ours = dispatch.build(
                schemas.InpaintRequest,
                RENAMES,
                image=image,
                mask=mask,
                prompt=form.get("prompt") or "",
                model=_model(form.get("model")),
                num=_form_int(form, "n", 1),
            )
            return await answer("inpaint", ours, form.get("response_format"), request)

        return await refused(go())

    @r.post("/v1/images/variations")
    async def variations(request: Request) -> Response:
        """multipart: image, n, model, response_format: img2img of the image with no prompt."""

        async def go():
            form = await _form(request)
            image = await _file(form, "image")
            ours = dispatch.build(
                schemas.Img2ImgRequest,
                RENAMES,
                image=image,
                strength=VARIATION_STRENGTH,
                model=_model(form.get("model")),
                num=_form_int(form, "n", 1),
            )
            return await answer("img2img", ours, form.get("response_format"), request)

        return await refused(go())

    if prefix:

        @r.get("/v1/models")
        def models() -> dict:
            return models_list(ctx.store.names())

    else:

        @r.get("/files/{job_id}/{index}.png", include_in_schema=False)
        async def result_file(job_id: str, index: int) -> Response:
            job = ctx.queue.get(job_id) if job_id in files else None
            if job is None or job.status != "done" or not 0 <= index < len(job.images):
                return error(404, "no such image (results are kept a while only)")
            return Response(base64.b64decode(job.images[index]["png"]), media_type="image/png")

    return r


async def _form(request: Request):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(400, "send multipart/form-data (image, mask, prompt, n ...)")
    try:
        return await request.form(max_files=4, max_fields=32)
    except Exception as e:  # python-multipart's and Starlette's parse errors
        raise Refused(400, f"unreadable multipart body ({type(e).__name__})") from None


def _images(job: Job, response_format: str, request: Request, files: OrderedDict) -> dict:
    """OpenAI's ImagesResponse for a finished job."""
    prompt = job.task.parameters.get("prompt")
    if response_format == "url":
        files[job.id] = None
        while len(files) > MAX_FILES:
            files.popitem(last=False)
        base = str(request.base_url).rstrip("/")
        data = [
            {"url": f"{base}/files/{job.id}/{i}.png", "revised_prompt": prompt}
            for i in range(len(job.images))
        ]
    else:
        data = [{"b64_json": im["png"], "revised_prompt": prompt} for im in job.images]
    return {"created": int(time.time()), "data": data}
