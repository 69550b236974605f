"""The server's settings (what `latentforge serve` parses), one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .schemas import MAX_NUM, MAX_STEPS


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
    max_body_bytes: int = 24_000_000
    device: str = "cpu"  # where models run ("auto": CUDA, else MPS, else CPU)
    dtype: str = "fp32"  # their weights' precision (io.model_folder.DTYPES)

    def __post_init__(self):
        if not 1 <= self.max_steps <= MAX_STEPS:
            raise UserError(f"max_steps must be in 1..{MAX_STEPS}, got {self.max_steps}")
        if not 1 <= self.max_num <= MAX_NUM:
            raise UserError(f"max_num must be in 1..{MAX_NUM}, got {self.max_num}")
        if self.max_queue < 1 or self.workers < 0:
            raise UserError("max_queue must be >= 1 and workers >= 0")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key must not be empty")
        from ..io.model_folder import check_dtype, resolve_device

        check_dtype(self.dtype, resolve_device(self.device))  # a bad one fails at start
