"""Jobs and the bounded job queue: a fixed number of worker threads, cancellation, bounded memory.

A job is a `Task` (what to run) plus its state. Workers call `runner(job)`, which reports
progress through `Job.report` from the sampler callback; `Job.report` raises `JobCancelled`
once a cancel was requested, so a running job stops at its next step. Every failure becomes a
failed job (the HTTP layer never sees it): UserError with its message, anything else as an
internal error (the traceback goes to the log).

Wake-ups are events, never polling: workers wait on a `threading.Condition` (notified by
`submit`), event streams on an `asyncio.Event` set from the worker thread through
`call_soon_threadsafe`. A stream can ask to be woken by state changes only (status, cancel
request: `Job.update`) and not by every sampler step (`Job.report`), so a fast sampler does
not wake the event loop, and take the GIL from the sampler, at every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError

log = logging.getLogger("latentforge.server")

FINAL = ("done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised from the sampler callback to stop a job whose cancel was requested."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the job queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Task:
    """What a job runs: `run(model, callback) -> images (B, C, H, W) in [-1, 1]`."""

    kind: str
    model: str
    parameters: dict[str, Any]
    total: int
    run: Callable
    seeds: list[int] | None = None  # per-image seed for each image's metadata
    preview: bool = True  # live previews while sampling (the request's `preview`)
    loras: list = field(default_factory=list)  # io.lora.LoraSpec files fused for this job


@dataclass(eq=False)  # identity: the queue finds a job by `is`, not by comparing every field
class Job:
    task: Task
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    step: int = 0
    preview: str | None = field(default=None, repr=False)  # base64: large
    images: list[dict] = field(default_factory=list, repr=False)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    finished_at: float | None = None  # time.monotonic() when it became final (benchmarks)
    version: int = 0  # bumped on every change (steps too); event streams wait on it
    state_version: int = 0  # bumped on state changes only (status, cancel request, result)
    cancel_requested: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: list = field(default_factory=list, repr=False)  # (loop, asyncio.Event, state_only)

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def report(self, step: int, preview: str | None = None) -> None:
        """Progress from the sampler callback (steps only go forward: RePaint repeats some).
        Wakes only the streams that asked for every step (`changed(state_only=False)`)."""
        if self.cancel_requested:
            raise JobCancelled
        with self._lock:
            self.step = min(max(self.step, step), self.task.total)
            if preview is not None:
                self.preview = preview
            self.version += 1
            waiters = [w for w in self._waiters if not w[2]]
        _wake(waiters)

    def update(self, **changes) -> None:
        """A state change (status, cancel request, results): wakes every waiting stream."""
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, v)
            if self.status in FINAL and self.finished_at is None:
                self.finished_at = time.monotonic()
            self.version += 1
            self.state_version += 1
            waiters = list(self._waiters)
        _wake(waiters)

    async def changed(self, seen: int, timeout: float, *, state_only: bool = False) -> None:
        """Wait (in an event loop) until `version` differs from `seen`, or `timeout` s pass.
        state_only: compare `state_version` instead, and sleep through mere steps."""
        waiter = (asyncio.get_running_loop(), asyncio.Event(), state_only)
        with self._lock:
            if (self.state_version if state_only else self.version) != seen:
                return
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    def snapshot(self, *, images: bool = True, preview: bool = True) -> dict[str, Any]:
        with self._lock:
            return self._snapshot(images, preview)

    def _snapshot(self, images: bool, preview: bool) -> dict[str, Any]:
        total = self.task.total
        done = self.status == "done"
        return {
            "id": self.id,
            "kind": self.task.kind,
            "status": self.status,
            "step": total if done else self.step,
            "total": total,
            "progress": 1.0 if done else (self.step / total if total else 0.0),
            "cancel_requested": self.cancel_requested,
            "preview": self.preview if preview else None,
            "images": list(self.images) if images else [],
            "error": self.error,
            "parameters": self.task.parameters,
            "timings": dict(self.timings),
        }

    def progress(self) -> tuple[int, int, dict[str, Any]]:
        """(version, state_version, the small progress view) read at one instant."""
        with self._lock:
            total = self.task.total
            event = {
                "id": self.id,
                "status": self.status,
                "step": self.step,
                "total": total,
                "progress": self.step / total if total else 0.0,
                "preview": self.preview,
                "cancel_requested": self.cancel_requested,
            }
            return self.version, self.state_version, event

    def final_json(self, preview: bool = True) -> str | None:
        """A finished job as JSON text (GET /v1/jobs/{id} and the final event), or None while it
        is not finished. Encoded directly: no response-model validation of the images. (Not
        kept: a finished job is typically read once, and a copy would double its memory.)"""
        with self._lock:
            if self.status not in FINAL:
                return None
            snap = {**self._snapshot(True, preview), "queue_position": None}
        return json.dumps(snap, ensure_ascii=True)


def _wake(waiters: list) -> None:
    for loop, event, _ in waiters:
        with contextlib.suppress(RuntimeError):  # that loop has closed
            loop.call_soon_threadsafe(event.set)


class JobQueue:
    """Waiting jobs (at most `max_queue`), `workers` threads, the last `keep_finished` results."""

    def __init__(
        self,
        runner: Callable[[Job], list[dict]],
        *,
        workers: int = 1,
        max_queue: int = 8,
        keep_finished: int = 256,
        keep_bytes: int = 256 * 2**20,
    ):
        if workers < 0 or max_queue < 1 or keep_finished < 1:
            raise UserError("workers must be >= 0, max_queue and keep_finished >= 1")
        self.runner = runner
        self.workers, self.max_queue, self.keep_finished = workers, max_queue, keep_finished
        self.keep_bytes = keep_bytes  # base64 results held by finished jobs, at most
        self._kept_bytes = 0
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._waiting: deque[Job] = deque()
        self._finished: deque[tuple[str, int]] = deque()  # (job id, bytes it holds)
        self._running = 0
        self._reserved = 0  # places held by requests still being checked (`reserve`)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._mean_run_s = 1.0  # running mean of job run times, for Retry-After

    # ----- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._threads:
                return
            self._stopping = False
            for i in range(self.workers):
                t = threading.Thread(target=self._work, name=f"latentforge-worker-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and join the workers (running jobs stop at their next step)."""
        with self._cond:
            self._stopping = True
            for job in list(self._jobs.values()):
                if not job.finished:
                    job.cancel_requested = True
            while self._waiting:
                self._retire(self._waiting.popleft(), "cancelled")
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    # ----- client side -------------------------------------------------------------------------
    def submit(self, task: Task) -> Job:
        """Queue `task` now; QueueFull when no place is free."""
        with self.reserve() as enqueue:
            return enqueue(task)

    @contextlib.contextmanager
    def reserve(self) -> Iterator[Callable[[Task], Job]]:
        """Hold a queue place while a request is checked (its images decoded): QueueFull at
        once when there is none, so a refused request costs nothing. Yields `submit` for the
        held place (it fails only once the queue stops); the place is given back unused."""
        with self._cond:
            if len(self._waiting) + self._reserved >= self.max_queue or self._stopping:
                raise QueueFull(self.retry_after())
            self._reserved += 1
        held = True

        def submit(task: Task) -> Job:
            nonlocal held
            with self._cond:
                if self._stopping:
                    raise QueueFull(self.retry_after())
                held = False
                self._reserved -= 1
                return self._enqueue(task)

        try:
            yield submit
        finally:
            with self._cond:
                if held:
                    self._reserved -= 1

    def _enqueue(self, task: Task) -> Job:
        job = Job(task)
        self._jobs[job.id] = job
        self._waiting.append(job)
        self._cond.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until a queue slot probably frees: when the next running job ends."""
        return max(1, math.ceil(self._mean_run_s / max(self.workers, 1)))

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once (it never runs); a running one at its next step."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                return job
            job.cancel_requested = True
            if job.status == "queued":
                self._waiting.remove(job)
                self._retire(job, "cancelled")
            else:
                job.update()  # wake event streams: cancel_requested changed
            return job

    def queue_position(self, job: Job) -> int | None:
        # not deque.index: its ValueError for a job not waiting (most calls) formats repr(job)
        with self._cond:
            return next((i for i, w in enumerate(self._waiting) if w is job), None)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "queued": len(self._waiting),
                "running": self._running,
                "workers": self.workers,
                "max_queue": self.max_queue,
                "kept": len(self._jobs),
                "kept_bytes": self._kept_bytes,
            }

    # ----- workers -----------------------------------------------------------------------------
    def _retire(self, job: Job, status: str, **changes) -> None:
        """Mark a job finished and forget the oldest finished ones beyond `keep_finished` jobs
        or `keep_bytes` of results (call with _cond held; the newest is always kept)."""
        job.update(status=status, **changes)
        job.task.run = None  # its closure holds the request's inputs: not kept with the result
        size = sum(len(im["png"]) for im in job.images) + len(job.preview or "")
        self._finished.append((job.id, size))
        self._kept_bytes += size
        while len(self._finished) > 1 and (
            len(self._finished) > self.keep_finished or self._kept_bytes > self.keep_bytes
        ):
            old, old_size = self._finished.popleft()
            self._kept_bytes -= old_size
            self._jobs.pop(old, None)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self._running += 1
                job.update(status="running")
            status, changes = "failed", {"error": "internal error: the worker stopped"}
            try:
                status, changes = self._run(job)
            finally:
                with self._cond:
                    self._running -= 1
                    self._retire(job, status, **changes)

    def _run(self, job: Job) -> tuple[str, dict]:
        start = time.monotonic()
        job.timings["queued_s"] = start - job.created
        try:
            with torch.no_grad():
                images = self.runner(job)
            result: tuple[str, dict] = ("done", {"images": images})
        except JobCancelled:
            result = ("cancelled", {})
        except UserError as e:
            result = ("failed", {"error": str(e)})
        except Exception as e:  # a bug or an unforeseen input: a failed job, never a 500
            log.exception("job %s (%s) failed", job.id, job.task.kind)
            result = ("failed", {"error": f"internal error: {type(e).__name__}: {e}"})
        run_s = time.monotonic() - start
        job.timings["run_s"] = run_s
        self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * run_s
        return result
