"""Requests -> queued jobs, shared by latentforge's own API and the drop-in dialects (A1111's
/sdapi/v1, OpenAI's /v1/images): one place that holds a queue slot, builds the task (every check
in `tasks`) and turns each refusal into a `Refused` (status, message, field), which each dialect
then words in its own error shape. The dialects are synchronous: `finished` waits for the job
without polling (`Job.changed`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import UserError
from . import tasks
from .config import ServerConfig
from .jobs import Job, JobQueue, QueueFull
from .store import BadModelName, ModelNotFound, ModelStore

WAIT_S = 30.0  # a synchronous request re-checks its job at least this often


class Refused(Exception):
    """A request refused before it was queued: HTTP `status`, the field at fault if any."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers or {}


@dataclass
class Context:
    """What a router needs: the queue, the models, the server's limits, the image decoder,
    and per-dialect state (A1111's selected checkpoint and current job)."""

    queue: JobQueue
    store: ModelStore
    config: ServerConfig
    decoder: tasks.ImageDecoder
    state: dict[str, Any] = field(default_factory=dict)


def enqueue(ctx: Context, kind: str, req: BaseModel) -> Job:
    """Queue a job for `req` (one of `schemas`' requests): a queue place first (429 costs
    nothing), then the request's checks, cheapest first (`tasks`), images decoded last."""
    try:
        with ctx.queue.reserve() as put:
            return put(tasks.BUILDERS[kind](req, ctx.store, ctx.config, images=ctx.decoder))
    except QueueFull as e:
        raise Refused(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    except tasks.FieldError as e:
        raise Refused(422, str(e), e.field) from None
    except ModelNotFound as e:
        raise Refused(404, str(e), "model") from None
    except tasks.ImageTooLarge as e:
        raise Refused(413, str(e)) from None
    except (BadModelName, tasks.BadImage) as e:
        raise Refused(400, str(e)) from None
    except UserError as e:
        raise Refused(422, str(e)) from None


async def submit(ctx: Context, kind: str, req: BaseModel) -> Job:
    """`enqueue` from an event loop: txt2img on the loop itself (nothing to decode, no thread
    handoff), requests with images (control images too) in a worker thread (their decoding
    would block the loop)."""
    if kind == "txt2img" and not getattr(req, "controls", None):
        return enqueue(ctx, kind, req)
    return await asyncio.to_thread(enqueue, ctx, kind, req)


def build(schema: type[BaseModel], renames: Mapping[str, str] | None = None, **fields) -> Any:
    """`schema(**fields)` (a latentforge request built from a dialect's), a validation error as
    a 422 `Refused` naming the dialect's own field (`renames`: ours -> theirs)."""
    try:
        return schema(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else None
        name = (renames or {}).get(name, name)
        raise Refused(422, f"{name}: {err['msg']}" if name else err["msg"], name) from None


async def finished(job: Job) -> Job:
    """Wait until `job` is done, failed or cancelled (woken by the job itself)."""
    while True:
        seen = job.state_version
        if job.finished:
            return job
        await job.changed(seen, WAIT_S, state_only=True)
