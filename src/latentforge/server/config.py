"""The server's settings (what `latentforge serve` parses), one frozen dataclass."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .schemas import MAX_NUM, MAX_STEPS

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Starlette's TestClient sends `Host: testserver`; `latentforge serve` passes its own list.
TEST_CLIENT_HOST = "testserver"


@dataclass(frozen=True)
class ServerConfig:
    model: str | Path | None = None  # one model folder (named after the folder)
    models_dir: str | Path | None = None  # a folder of model folders, chosen by name
    max_queue: int = 8  # waiting jobs; one more is a 429
    workers: int = 1  # worker threads (jobs sampled at the same time)
    api_key: str | None = None  # required on /v1/* when set
    max_steps: int = MAX_STEPS  # per-request limits, at most the schema's
    max_num: int = MAX_NUM
    keep_finished: int = 256  # finished jobs kept for GET /v1/jobs/{id}
    keep_mb: int = 256  # ... and at most this many MB of their results
    max_loaded: int = 2  # models kept in memory
    preview_interval: float = 0.25  # seconds between two live previews of one job
    progress_interval: float = 0.1  # seconds between two progress events of one event stream
    preload: bool = True  # load the default model when the server starts
    max_body_bytes: int = 24_000_000  # request body, counted as it arrives (413)
    device: str = "cpu"  # where models run ("auto": CUDA, else MPS, else CPU)
    dtype: str = "fp32"  # their weights' precision (io.model_folder.DTYPES)
    max_image_pixels: int = 4_194_304  # one input image, read from its header (413)
    max_decodes: int = 2  # input images decoded at the same time
    # steps x denoiser pixels x images (x tiles), estimated before queueing (422); the
    # default lets a 128 px image through the embedded x4 upscaler at its default steps
    max_job_work: int = 16_000_000
    job_timeout: float | None = 900.0  # seconds a job may run; then it fails
    body_timeout: float = 30.0  # seconds for a request's whole body to arrive (408)
    header_timeout: float = 10.0  # seconds for a request's headers (then the connection closes)
    keep_alive: float = 5.0  # seconds an idle connection stays open
    max_connections: int = 256  # connections + requests in flight; more get 503
    host: str = "127.0.0.1"  # the address the server is bound to (for the Host check)
    allowed_hosts: tuple[str, ...] = (TEST_CLIENT_HOST,)  # more Host names; "*": any
    api_auth: str | None = None  # "USER:PASS": HTTP basic auth on /sdapi/* (A1111's --api-auth)
    loras_dir: str | Path | None = None  # LoRA files listed by /sdapi/v1/loras
    embeddings_dir: str | Path | None = None  # ... embeddings by /sdapi/v1/embeddings
    controlnets_dir: str | Path | None = None  # ControlNet folders requests name

    def __post_init__(self):
        if not 1 <= self.max_steps <= MAX_STEPS:
            raise UserError(f"max_steps must be in 1..{MAX_STEPS}, got {self.max_steps}")
        if not 1 <= self.max_num <= MAX_NUM:
            raise UserError(f"max_num must be in 1..{MAX_NUM}, got {self.max_num}")
        if self.max_queue < 1 or self.workers < 0:
            raise UserError("max_queue must be >= 1 and workers >= 0")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key must not be empty")
        if self.api_auth is not None:
            user, sep, password = self.api_auth.partition(":")
            if not sep or not user or not password:
                raise UserError("--api-auth must be USER:PASS, both non-empty")
        positive = {
            "max_body_bytes": self.max_body_bytes, "max_image_pixels": self.max_image_pixels,
            "max_decodes": self.max_decodes, "max_job_work": self.max_job_work,
            "body_timeout": self.body_timeout, "header_timeout": self.header_timeout,
            "keep_alive": self.keep_alive, "max_connections": self.max_connections,
            "job_timeout": 1 if self.job_timeout is None else self.job_timeout,
        }  # fmt: skip
        for name, value in positive.items():
            if not value > 0:  # also NaN
                raise UserError(f"{name} must be > 0, got {value}")
        from ..io.model_folder import check_dtype, resolve_device

        check_dtype(self.dtype, resolve_device(self.device))  # a bad one fails at start

    def loras_folder(self) -> Path | None:
        """Where LoRA files are listed from: `loras_dir`, else `loras/` in `models_dir`."""
        return self._beside_models(self.loras_dir, "loras")

    def embeddings_folder(self) -> Path | None:
        """Where embeddings are listed from: `embeddings_dir`, else `embeddings/` in
        `models_dir`."""
        return self._beside_models(self.embeddings_dir, "embeddings")

    def controlnets_folder(self) -> Path | None:
        """Where ControlNet folders are listed from: `controlnets_dir`, else `controlnets/` in
        `models_dir`."""
        return self._beside_models(self.controlnets_dir, "controlnets")

    def _beside_models(self, folder: str | Path | None, name: str) -> Path | None:
        if folder is not None:
            return Path(folder)
        return None if self.models_dir is None else Path(self.models_dir) / name

    def host_names(self) -> frozenset[str] | None:
        """The Host header names this server answers to (lower case, no port), or None for any:
        loopback names, the bound host and `allowed_hosts`; any when `allowed_hosts` holds "*",
        or when bound to a non-loopback address with no names of its own."""
        extra = {h.strip().lower().strip("[]").rstrip(".") for h in self.allowed_hosts}
        if "*" in extra or (not is_loopback(self.host) and not extra - {TEST_CLIENT_HOST}):
            return None
        return frozenset({*LOOPBACK_NAMES, self.host.lower().strip("[]"), *extra})


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    host = host.lower().strip("[]").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
