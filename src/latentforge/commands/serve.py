"""`latentforge serve`: the HTTP API and web UI (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

import os
import socket

import click

from ..errors import UserError
from .options import device_options, model_option


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@model_option(help="a model folder (default: the embedded model)")
@click.option("--models-dir", default=None, type=click.Path(),
              help="a folder of model folders, chosen per request by name")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(min=1), default=8, show_default=True,
              help="waiting jobs; more get HTTP 429")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="jobs sampled at the same time (threads)")  # fmt: skip
@click.option("--api-key", default=None, envvar="LATENTFORGE_API_KEY",
              help="require this key on /v1/* (or set LATENTFORGE_API_KEY)")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(1, 200), default=200, show_default=True)
@click.option("--max-num", type=click.IntRange(1, 16), default=16, show_default=True)
@click.option(
    "--max-image-pixels",
    type=click.IntRange(min=1),
    default=4_194_304,
    show_default=True,
    help="largest input image (width x height); more get 413",
)
@click.option(
    "--max-job-work",
    type=click.IntRange(min=1),
    default=16_000_000,
    show_default=True,
    help="largest job, in steps x denoiser pixels x images (x tiles); more get 422",
)
@click.option(
    "--job-timeout",
    type=click.FloatRange(min=0),
    default=900.0,
    show_default=True,
    help="seconds a job may run before it fails (0: no limit)",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="seconds for a request body to arrive; then 408",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="a Host name to answer besides loopback and --host (repeatable; '*': any)",
)
@click.option("--api-auth", default=None, metavar="USER:PASS", envvar="LATENTFORGE_API_AUTH",
              help="basic auth on /sdapi/v1 (as A1111's --api-auth)")  # fmt: skip
@click.option("--loras-dir", default=None, type=click.Path(file_okay=False),
              help="LoRA files for /sdapi/v1/loras (default: loras/ in --models-dir)")  # fmt: skip
@click.option("--embeddings-dir", default=None, type=click.Path(file_okay=False),
              help="embeddings listed by /sdapi/v1/embeddings (default: embeddings/ in "
              "--models-dir)")  # fmt: skip
@click.option("--controlnets-dir", default=None, type=click.Path(file_okay=False),
              help="ControlNet folders requests may name (default: controlnets/ in "
              "--models-dir)")  # fmt: skip
@device_options
@click.option("--quiet", is_flag=True, help="no access log")
def serve(host, port, model_dir, models_dir, max_queue, workers, api_key, max_steps, max_num,
          max_image_pixels, max_job_work, job_timeout, body_timeout, allowed_hosts, api_auth,
          loras_dir, embeddings_dir, controlnets_dir, device, dtype, quiet) -> None:  # fmt: skip
    """Serve the HTTP API (/v1/..., schema at /openapi.json), the web UI (/) and the drop-in
    A1111 (/sdapi/v1) and OpenAI (/v1/images) APIs (docs/clients.md)."""
    try:
        import uvicorn

        from ..server import ServerConfig, create_app
        from ..server.app import uvicorn_options
        from ..server.config import is_loopback
    except ImportError as e:
        raise UserError(
            f"serve needs the serve extra ({e.name} is missing): pip install 'latentforge[serve]'"
        ) from None
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # share the cores among the workers
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    config = ServerConfig(
        model=model_dir, models_dir=models_dir, max_queue=max_queue, workers=workers,
        api_key=api_key, max_steps=max_steps, max_num=max_num, device=device, dtype=dtype,
        max_image_pixels=max_image_pixels, max_job_work=max_job_work,
        job_timeout=job_timeout or None, body_timeout=body_timeout, host=host,
        allowed_hosts=allowed_hosts, api_auth=api_auth, loras_dir=loras_dir,
        embeddings_dir=embeddings_dir, controlnets_dir=controlnets_dir,
    )  # fmt: skip
    app = create_app(config)
    names = app.state.store.names()
    _check_port(host, port)
    if not is_loopback(host) and not api_key:
        click.echo(f"latentforge: warning: listening on {host} without --api-key", err=True)
        if not api_auth:
            click.echo("latentforge: warning: ... and /sdapi/v1 without --api-auth", err=True)
    click.echo(
        f"latentforge: serving {len(names)} model(s) {names} on http://{host}:{port}/ "
        f"(queue {max_queue}, {workers} worker(s){', API key required' if api_key else ''})"
    )
    uvicorn.run(
        app, host=host, port=port, log_level="warning" if quiet else "info",
        access_log=not quiet, timeout_graceful_shutdown=5, **uvicorn_options(config),
    )  # fmt: skip


def _check_port(host: str, port: int) -> None:
    """A clear one-line error now rather than uvicorn's log line and exit later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
