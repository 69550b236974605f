"""The FastAPI application: routes over `tasks` (request -> job) and `jobs` (the queue).

Status codes: 202 accepted (poll /v1/jobs/{id} or stream /v1/jobs/{id}/events), 400 bad image
or model name, 401 missing API key, 404 unknown job / model, 413 body too large, 422 a field
(named in `detail[].loc`), 429 queue full (with Retry-After).
Failures while a job runs make a failed job, never a 500.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import metadata, resources
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import sampling
from ..errors import UserError
from ..io.model_folder import ModelFolder
from ..pipelines.settings import max_side, size_multiple
from . import schemas, tasks
from .config import ServerConfig
from .jobs import FINAL, Job, JobQueue, QueueFull
from .store import BadModelName, ModelNotFound, ModelStore

log = logging.getLogger("latentforge.server")
STATIC = Path(str(resources.files("latentforge.server") / "static"))
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SSE_KEEPALIVE_S = 15.0


@functools.cache  # importlib.metadata reads and parses files: most of a /health request
def _version() -> str:
    try:
        return metadata.version("latentforge")
    except metadata.PackageNotFoundError:
        return "0"


def _error(status: int, detail, headers: dict | None = None) -> Response:
    # ensure_ascii: an echoed value can never make the response itself fail to encode
    body = json.dumps({"detail": detail}, ensure_ascii=True)
    return Response(body, status, headers, media_type="application/json")


def field_detail(field: str, message: str) -> list[dict]:
    return [{"loc": ["body", field], "msg": message, "type": "value_error"}]


class _Guard:
    """ASGI middleware: refuse oversized bodies (413) and add security headers."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            resp = _error(413, f"request body larger than {self.max_body} bytes")
            return await resp(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                if scope["path"] == "/":
                    headers.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The app for `config`; its workers start and stop with the app's lifespan."""
    config = config or ServerConfig()
    store = ModelStore(config.model, config.models_dir, config.max_loaded, device=config.device,
                       dtype=config.dtype)  # fmt: skip
    queue = JobQueue(
        tasks.make_runner(store, config),
        workers=config.workers,
        max_queue=config.max_queue,
        keep_finished=config.keep_finished,
        keep_bytes=config.keep_mb * 2**20,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        if config.preload:
            threading.Thread(target=_preload, args=(store,), daemon=True).start()
        yield
        await asyncio.to_thread(queue.stop)

    app = FastAPI(
        title="latentforge",
        version=_version(),
        description="Diffusion sampling over HTTP: submit a job (202), then poll or stream it.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's /docs and /redoc pages load their JS from a CDN: not offline
        redoc_url=None,
    )
    app.state.config, app.state.store, app.state.queue = config, store, queue
    app.add_middleware(_Guard, max_body=config.max_body_bytes)
    _install_error_handlers(app)
    auth = _auth_dependency(config.api_key)

    # ----- open: health, UI --------------------------------------------------------------------
    # Cheap routes are `async def`: they run on the event loop itself. A plain `def` route (or
    # dependency) is run in a thread pool, a thread handoff each way per request. The routes
    # that decode images or read model folders stay plain `def`.
    @app.get("/health", response_model=schemas.Health, tags=["server"])
    async def health() -> dict:
        s = queue.stats()
        return {
            "status": "ok",
            "version": _version(),
            "queued": s["queued"],
            "running": s["running"],
            "workers": s["workers"],
            "max_queue": s["max_queue"],
        }

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ----- models and samplers -----------------------------------------------------------------
    @app.get(
        "/v1/models", response_model=list[schemas.ModelInfo], tags=["models"], dependencies=[auth]
    )
    def models() -> list[dict]:
        out, default = [], _default_or_none(store)
        for name in store.names():
            try:
                _, view = store.view(name)
            except (UserError, OSError):
                continue
            info = _model_info(view)
            out.append({"name": name, "default": name == default, "loaded": store.is_loaded(name),
                        **info})  # fmt: skip
        return out

    @app.get(
        "/v1/samplers",
        response_model=list[schemas.SamplerInfo],
        tags=["models"],
        dependencies=[auth],
    )
    def samplers() -> list[dict]:
        return [
            {
                "name": name,
                "stochastic": name in sampling.STOCHASTIC,
                "knobs": {k: _json_number(v) for k, v in sampling.sampler_knobs(name).items()},
                "doc": (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
            }
            for name, fn in sorted(sampling.SAMPLERS.items())
        ]

    # ----- jobs --------------------------------------------------------------------------------
    def submit(kind: str, req) -> JSONResponse:
        try:
            task = tasks.BUILDERS[kind](req, store, config)
            job = queue.submit(task)
        except QueueFull as e:
            return _error(429, str(e), {"Retry-After": str(e.retry_after)})
        except tasks.FieldError as e:
            return _error(422, field_detail(e.field, str(e)))
        except ModelNotFound as e:
            return _error(404, str(e))
        except (BadModelName, tasks.BadImage) as e:
            return _error(400, str(e))
        except UserError as e:
            return _error(422, str(e))
        pos = queue.queue_position(job)
        body = {"id": job.id, "status": job.status, "queue_position": pos}
        return JSONResponse(body, 202, {"Location": f"/v1/jobs/{job.id}"})

    responses = {
        202: {"model": schemas.JobAccepted, "description": "queued"},
        400: {"description": "bad image or model name"},
        404: {"description": "unknown model"},
        422: {"description": "a field is invalid (named in detail[].loc)"},
        429: {"description": "queue full; see Retry-After"},
    }

    @app.post(
        "/v1/txt2img",
        status_code=202,
        responses=responses,
        tags=["generate"],
        dependencies=[auth],
        response_model=schemas.JobAccepted,
    )
    async def txt2img(req: schemas.Txt2ImgRequest) -> JSONResponse:
        return submit("txt2img", req)

    @app.post(
        "/v1/img2img",
        status_code=202,
        responses=responses,
        tags=["edit"],
        dependencies=[auth],
        response_model=schemas.JobAccepted,
    )
    def img2img(req: schemas.Img2ImgRequest) -> JSONResponse:
        return submit("img2img", req)

    @app.post(
        "/v1/inpaint",
        status_code=202,
        responses=responses,
        tags=["edit"],
        dependencies=[auth],
        response_model=schemas.JobAccepted,
    )
    def inpaint(req: schemas.InpaintRequest) -> JSONResponse:
        return submit("inpaint", req)

    @app.post(
        "/v1/upscale",
        status_code=202,
        responses=responses,
        tags=["edit"],
        dependencies=[auth],
        response_model=schemas.JobAccepted,
    )
    def upscale(req: schemas.UpscaleRequest) -> JSONResponse:
        return submit("upscale", req)

    @app.post(
        "/v1/interpolate",
        status_code=202,
        responses=responses,
        tags=["edit"],
        dependencies=[auth],
        response_model=schemas.JobAccepted,
    )
    def interpolate(req: schemas.InterpolateRequest) -> JSONResponse:
        return submit("interpolate", req)

    def get_job(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"unknown job {job_id!r} (finished jobs are kept a while)")
        return job

    def info(job: Job, preview: bool = True) -> dict:
        return {**job.snapshot(preview=preview), "queue_position": queue.queue_position(job)}

    not_found = {404: {"description": "unknown job"}}

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=schemas.JobInfo,
        tags=["jobs"],
        dependencies=[auth],
        responses=not_found,
    )
    async def job_status(job_id: str, preview: bool = True) -> Response | dict:
        job = get_job(job_id)
        text = job.final_json(preview)  # a finished job: straight to JSON, no validation
        if text is not None:
            return Response(text, media_type="application/json")
        return info(job, preview)

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=schemas.JobInfo,
        tags=["jobs"],
        dependencies=[auth],
        responses={**not_found, 409: {"description": "finished"}},
    )
    async def cancel_job(job_id: str) -> dict:
        job = get_job(job_id)
        if job.finished:
            raise HTTPException(409, f"job {job_id} is already {job.status}")
        queue.cancel(job_id)
        return info(job)

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        dependencies=[auth],
        responses={200: {"content": {"text/event-stream": {}}}, **not_found},
    )
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: `progress` (status, step, total, preview) when the job changes (a
        status change at once, steps at most every `progress_interval` s; `preview` only when a
        new one exists, else null), then one final `done` / `failed` / `cancelled` event holding
        the whole job, then the end."""
        job = get_job(job_id)
        return StreamingResponse(
            _event_stream(job, queue, config.progress_interval),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _event_stream(job: Job, queue: JobQueue, interval: float):
    """The SSE body of one job. Woken by the job itself (never by polling): at once for a state
    change (status, cancel request, the result), and for mere steps at most every `interval` s
    (while it waits out the interval it is not woken by steps at all)."""
    loop = asyncio.get_running_loop()
    seen = seen_state = -1
    next_progress = -math.inf
    sent_preview = None
    while True:
        final = job.final_json()
        if final is not None:
            yield _sse_text(job.status, final)
            return
        version, state, event = job.progress()
        if event["status"] in FINAL:  # it finished just now: the final event, next time round
            continue
        if version == seen:
            await job.changed(seen, SSE_KEEPALIVE_S)
            if job.version == seen:
                yield ": keep-alive\n\n"
            continue
        now = loop.time()
        if state == seen_state and now < next_progress:
            await job.changed(seen_state, next_progress - now, state_only=True)
            continue
        seen, seen_state, next_progress = version, state, now + interval
        if event["preview"] is sent_preview:
            event["preview"] = None  # the client has it already
        else:
            sent_preview = event["preview"]
        event["queue_position"] = queue.queue_position(job)
        yield _sse_text("progress", json.dumps(event, ensure_ascii=True))


def _sse_text(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


def _model_info(view: ModelFolder) -> dict:
    """What /v1/models says about a model, from its model.json alone."""
    c, h, w = view.output_shape
    return {
        "task": view.task, "scale": view.meta.scale if view.task == "superres" else None,
        "width": w, "height": h, "channels": c, "latent": view.meta.latent is not None,
        "conditioning": view.conditioning,
        "class_names": [] if view.conditioning == "text" else [str(n) for n in view.class_names],
        "defaults": view.meta.sampling.to_json() if view.meta.sampling else {},
        "size_multiple": size_multiple(view), "max_side": max_side(view),
    }  # fmt: skip


def _json_number(value):
    """inf / nan as strings ("inf"): JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _default_or_none(store: ModelStore) -> str | None:
    try:
        return store.default_name
    except UserError:
        return None


def _preload(store: ModelStore) -> None:
    try:
        name = store.default_name
        store.get(name)
        log.info("loaded model %r", name)
    except Exception as e:  # the server still runs; jobs for this model fail with the reason
        log.warning("could not preload the default model: %s", e)


def _auth_dependency(api_key: str | None):
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: KEY")

    async def check(  # async: no thread handoff per request
        cred: HTTPAuthorizationCredentials | None = Depends(bearer),
        key: str | None = Depends(header),
    ) -> None:
        if api_key is None:
            return
        given = key or (cred.credentials if cred else "")
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})

    return Depends(check)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        # the field's location and message, never the (possibly huge or unencodable) input
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return _error(422, detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> Response:
        return _error(422, str(exc))


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread (tests, benchmarks); yields its base URL."""
    import socket

    import uvicorn

    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only then (else Nagle costs 40 ms a request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
