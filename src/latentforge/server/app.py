"""The FastAPI application: routes over `tasks` (request -> job) and `jobs` (the queue).

Status codes: 202 accepted (poll /v1/jobs/{id} or stream /v1/jobs/{id}/events), 400 bad image,
model name or Host header, 401 missing API key, 404 unknown job / model, 408 body too slow, 413
body or image too large, 422 a field (named in `detail[].loc`), 429 queue full (with
Retry-After), 503 too many connections (uvicorn's `limit_concurrency`).
Failures while a job runs make a failed job, never a 500.

Beside latentforge's own API the app serves two drop-in dialects, each with its own error
shape: AUTOMATIC1111's /sdapi/v1 (`a1111.py`) and OpenAI's images API (`openai_api.py`). All
three share one queue, one set of limits and one API key (`dispatch.py`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
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
from ..io.controlnet import controlnet_folders
from ..io.model_folder import ModelFolder, read_model_meta
from ..pipelines.settings import max_side, size_multiple
from . import a1111, dispatch, openai_api, schemas, tasks
from .config import ServerConfig, is_loopback
from .jobs import FINAL, Job, JobQueue
from .store import ModelStore

log = logging.getLogger("latentforge.server")
STATIC = Path(str(resources.files("latentforge.server") / "static"))
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SSE_KEEPALIVE_S = 15.0
KEYED = ("/v1/", "/openai/", a1111.PREFIX + "/")  # the paths the API key (or --api-auth) guards


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


def _error_for(path: str, status: int, detail, headers: dict | None = None) -> Response:
    """An error in the shape of the API that serves `path`: A1111's, OpenAI's or ours."""
    if path.startswith(a1111.PREFIX):
        return a1111.error(status, detail, headers=headers)
    if openai_api.serves(path):
        return openai_api.error(status, detail, headers=headers)
    return _error(status, detail, headers)


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _Guard:
    """ASGI middleware in front of everything, in order: the Host header (400: DNS rebinding),
    the declared Content-Length (413), the API key on /v1/* (401), then the body itself, counted
    as it arrives, chunked or not (413 once past `max_body_bytes`) and timed (408 when it has not
    all arrived `body_timeout` s after the headers). So no refusal reads (or parses) the body,
    and nothing behind this reads more than the limit. Adds security headers to every reply."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.max_body, self.body_timeout = app, config.max_body_bytes, config.body_timeout
        self.key = None if config.api_key is None else config.api_key.encode()
        self.basic = None if config.api_auth is None else config.api_auth.encode()
        self.hosts = config.host_names()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._check_headers(scope)
        path = scope["path"]
        if refusal is None:
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
            except _BodyTooLarge:
                refusal = _refuse(path, 413, f"request body larger than {self.max_body} bytes")
            except TimeoutError:
                refusal = _refuse(
                    path, 408, f"the request body did not arrive in {self.body_timeout:g} s"
                )
            except _ClientGone:
                return None
        if refusal is not None:
            return await refusal(scope, receive, send)

        replayed = False

        async def replay():  # the body read here, then the client's own messages (disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

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

        return await self.app(scope, replay, send_with_headers)

    def _check_headers(self, scope) -> Response | None:
        """The refusal the headers alone earn, if any."""
        headers = dict(scope.get("headers", []))
        path = scope["path"]
        host = _host_name(headers.get(b"host", b""))
        if host and self.hosts is not None and host not in self.hosts and not is_loopback(host):
            return _refuse(
                path,
                400,
                f"untrusted Host header {host!r} (this server answers to "
                f"{', '.join(sorted(self.hosts))}): start it with --allowed-host {host} to "
                "serve that name",
            )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return _refuse(path, 413, f"request body larger than {self.max_body} bytes")
        if path.startswith(KEYED) and not self._authorized(path, headers):
            scheme = 'Basic realm="latentforge"' if path.startswith(a1111.PREFIX) else "Bearer"
            return _refuse(path, 401, "missing or wrong API key", {"WWW-Authenticate": scheme})
        return None

    def _authorized(self, path: str, headers: dict[bytes, bytes]) -> bool:
        """The API key (X-API-Key or Bearer) where one is set; on /sdapi/* also (or, with
        only --api-auth set, only) A1111's basic auth USER:PASS, and without --api-auth basic
        auth with the API key as password (A1111 clients can send nothing else)."""
        sdapi = path.startswith(a1111.PREFIX)
        if self.key is None and (self.basic is None or not sdapi):
            return True
        if self.key is not None and secrets.compare_digest(_given_key(headers), self.key):
            return True
        if not sdapi:
            return False
        given = _basic_credentials(headers)
        if self.basic is None:
            return secrets.compare_digest(given.partition(b":")[2], self.key)
        return secrets.compare_digest(given, self.basic)

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)  # one chunk: that very object, no copy


def _refuse(path: str, status: int, detail: str, headers: dict | None = None) -> Response:
    # the connection closes: the rest of the body is never read (nor kept alive for)
    return _error_for(path, status, detail, {**(headers or {}), "Connection": "close"})


def _host_name(value: bytes) -> str:
    """A Host header's name, lower case, without port, brackets or trailing dot."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _given_key(headers: dict[bytes, bytes]) -> bytes:
    """The API key a request gives: `X-API-Key: KEY` or `Authorization: Bearer KEY`."""
    if headers.get(b"x-api-key"):
        return headers[b"x-api-key"]
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _basic_credentials(headers: dict[bytes, bytes]) -> bytes:
    """`Authorization: Basic base64(USER:PASS)` -> b"USER:PASS" (b"" when absent)."""
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"basic":
        return b""
    try:
        return base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""


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
    app.add_middleware(_Guard, config=config)
    _install_error_handlers(app)
    auth = _auth_dependency()
    decoder = tasks.ImageDecoder.for_config(config)
    ctx = dispatch.Context(queue, store, config, decoder)
    app.include_router(a1111.make_router(ctx), dependencies=[auth])
    app.include_router(openai_api.make_router(ctx), dependencies=[auth])
    app.include_router(openai_api.make_router(ctx, "/openai"), dependencies=[auth])

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
        "/v1/models",
        response_model=list[schemas.ModelInfo | schemas.BrokenModelInfo],
        tags=["models"],
        dependencies=[auth],
    )
    def models(request: Request) -> list[dict] | Response:
        """latentforge's model list; OpenAI's for the official OpenAI SDKs (openai_api.py)."""
        if openai_api.wants_openai(request):
            return JSONResponse(openai_api.models_list(store.names()))
        out, default = [], _default_or_none(store)
        for name, view in store.entries():
            if isinstance(view, str):  # a folder whose model.json does not load: why
                out.append({"name": name, "status": "broken", "default": False, "error": view})
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

    @app.get(
        "/v1/controlnets",
        response_model=list[schemas.ControlNetInfo],
        tags=["models"],
        dependencies=[auth],
    )
    def controlnets() -> list[dict]:
        """The ControlNets of the server's controlnets folder (`serve --controlnets-dir`)."""
        out = []
        for name, folder in controlnet_folders(config.controlnets_folder()).items():
            section = read_model_meta(folder).controlnet
            out.append({"name": name, "preprocess": section.get("preprocess", "none"),
                        "base": section.get("base")})  # fmt: skip
        return out

    # ----- jobs --------------------------------------------------------------------------------
    def submit(kind: str, req) -> JSONResponse:
        """Queue a job: a queue place first (429 costs nothing), then the request's checks,
        cheapest first (tasks), images decoded last."""
        try:
            job = dispatch.enqueue(ctx, kind, req)
        except dispatch.Refused as e:
            field = e.field if e.status == 422 else None
            return _error(e.status, field_detail(field, str(e)) if field else str(e), e.headers)
        pos = queue.queue_position(job)
        body = {"id": job.id, "status": job.status, "queue_position": pos}
        return JSONResponse(body, 202, {"Location": f"/v1/jobs/{job.id}"})

    responses = {
        202: {"model": schemas.JobAccepted, "description": "queued"},
        400: {"description": "bad image or model name"},
        404: {"description": "unknown model"},
        413: {"description": "an image over the server's pixel limit"},
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


def _auth_dependency():
    """The API-key schemes as /openapi.json declares them. The key itself is checked by
    `_Guard`, before the body is read, so this dependency has nothing left to check."""
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: KEY")

    async def declared(  # async: no thread handoff per request
        cred: HTTPAuthorizationCredentials | None = Depends(bearer),
        key: str | None = Depends(header),
    ) -> None:
        return None

    return Depends(declared)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        # the field's location and message, never the (possibly huge or unencodable) input
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return _error_for(request.url.path, 422, detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        return _error_for(request.url.path, exc.status_code, exc.detail, headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> Response:
        return _error_for(request.url.path, 422, str(exc))


def uvicorn_options(config: ServerConfig) -> dict:
    """uvicorn.Config keywords for this server's connection limits: idle keep-alive connections
    close after `keep_alive` s, a request's headers must arrive within `header_timeout` s, and
    past `max_connections` connections and requests in flight uvicorn answers 503."""
    return {
        "http": _header_timeout_protocol(config.header_timeout),
        "timeout_keep_alive": config.keep_alive,
        "limit_concurrency": config.max_connections,
    }


def _header_timeout_protocol(timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that has
    not sent a whole request line and headers `timeout` s after it opened (or after its last
    response) gets 408 and is closed. uvicorn alone waits for them forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    detail = f"the request headers did not arrive in {timeout:g} s"
    body = json.dumps({"detail": detail}).encode()
    reply = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )

    class HeaderTimeoutProtocol(H11Protocol):
        _headers_due: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._expect_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._expect_headers()

        def connection_lost(self, exc) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            super().connection_lost(exc)

        def _expect_headers(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            self._headers_due = self.loop.call_later(timeout, self._headers_overdue)

        def _headers_overdue(self) -> None:
            # IDLE: no request line and headers since the deadline was set
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

    return HeaderTimeoutProtocol


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread (tests, benchmarks); yields its base URL."""
    import socket

    import uvicorn

    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only then (else Nagle costs 40 ms a request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            **uvicorn_options(app.state.config))  # fmt: skip
    server = uvicorn.Server(config)
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
