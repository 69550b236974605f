"""HTTP server overhead and throughput; prints JSON.

    python bench/server.py [--model DIR | --tiny] [--clients 1,8] [--jobs 8] [--steps 20]
                           [--workers 1] [--previews on,off] [--client raw|httpx] [--rows]
                           [--dialect ours,a1111,openai]

Runs the real app under uvicorn in a thread of this process; the clients run in a separate
process (so their own work never holds this process's GIL) and drive it over HTTP: each client
submits a txt2img job, follows its event stream to the final event, and repeats.

per_job (at the first client count, once with live previews and once with `"preview": false`):
  overhead = client-seen latency (POST sent -> final event parsed) - the sampler's time in the
  server (`timings.sample_s`), split exactly into
    submit    POST sent -> job queued (HTTP request, validation)
    queued    job queued -> a worker starts it
    previews  live previews (decode + PNG) during sampling
    encode    the result PNGs
    other     model lookup and worker bookkeeping
    deliver   worker done -> the client has parsed the final event (wake-up, JSON, HTTP)
  transport = submit + deliver. Also the same job redrawn right after by calling the pipeline
  directly (no server): `sampler_slowdown` = sample_s - that time, how much the sampler itself
  was slowed by the server running next to it (noisy on a loaded machine).
throughput: at N clients, completed jobs/s, client-seen latency p50/p95, the worker time per job
  not spent sampling (`service_overhead` = wall * workers / jobs - mean sample_s), the server's
  CPU time per job (`cpu_per_job`: in the worker threads, and in the rest, `http`: event loop
  and thread pool; low-noise where wall times are not), and /health requests/s (the HTTP floor).
`--client raw` (default) is a minimal asyncio HTTP/1.1 client (keep-alive, chunked SSE), so
transport is the server's; `--client httpx` uses httpx (its own cost, ~2 ms a request, shows).
`--model` defaults to the embedded model; `--tiny` trains a 2-step digits model first (~5 s).
`--dialect ours,a1111,openai`: instead, the same jobs (1 client, live previews on, as the
dialects have no switch for them) through latentforge's API (submit + event stream), A1111's
synchronous POST /sdapi/v1/txt2img and OpenAI's POST /v1/images/generations (b64_json), each
with its per_job parts as above (`dialects`), to compare their overhead per image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import statistics
import tempfile
import time

FINAL = ("done", "failed", "cancelled")


# ----- clients (run in the child process) -------------------------------------------------------
class RawHTTP:
    """One keep-alive HTTP/1.1 connection: JSON requests and a chunked event stream."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)

    async def open(self) -> RawHTTP:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        self.writer.close()

    async def send(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers

    async def chunks(self, headers: dict):
        if "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
            return
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            yield await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        await self.reader.readline()  # the empty trailer

    async def json(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        status, headers = await self.send(method, path, body)
        data = b"".join([c async for c in self.chunks(headers)])
        return status, json.loads(data)

    async def call(self, dialect: str, body: dict) -> tuple[float, float, dict | None]:
        """One image through `dialect`: (sent, answer parsed, the job or None: the parent
        finds a synchronous dialect's job in its queue)."""
        if dialect == "ours":
            return await self.follow(body)
        start = time.monotonic()
        path, body = DIALECTS[dialect](body)
        status, answer = await self.json("POST", path, body)
        if status != 200:
            raise RuntimeError(f"POST {path}: {status} {answer}")
        return start, time.monotonic(), None

    async def follow(self, body: dict) -> tuple[float, float, dict]:
        """Submit a job, read its event stream to the end: (sent, final event parsed, job)."""
        start = time.monotonic()
        status, job = await self.json("POST", "/v1/txt2img", body)
        if status != 202:
            raise RuntimeError(f"POST /v1/txt2img: {status} {job}")
        _, headers = await self.send("GET", f"/v1/jobs/{job['id']}/events")
        buffer, final = b"", None
        async for chunk in self.chunks(headers):  # read to the end: the connection is reused
            buffer += chunk
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                event, data = _sse_block(block)
                if event in FINAL:
                    final = (start, time.monotonic(), json.loads(data))
        if final is None:
            raise RuntimeError(f"event stream of {job['id']} ended without a final event")
        return final


class HttpxHTTP:
    def __init__(self, url: str):
        import httpx

        self.http = httpx.AsyncClient(base_url=url, timeout=600)

    async def open(self) -> HttpxHTTP:
        return self

    async def close(self) -> None:
        await self.http.aclose()

    async def json(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        r = await self.http.request(method, path, json=body)
        return r.status_code, r.json()

    call = RawHTTP.call

    async def follow(self, body: dict) -> tuple[float, float, dict]:
        start = time.monotonic()
        r = await self.http.post("/v1/txt2img", json=body)
        r.raise_for_status()
        async with self.http.stream("GET", f"/v1/jobs/{r.json()['id']}/events") as stream:
            event = None
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in FINAL:
                    return start, time.monotonic(), json.loads(line[6:])
        raise RuntimeError("event stream ended without a final event")


# a latentforge txt2img body -> (path, body) of the same request in each synchronous dialect
DIALECTS = {
    "a1111": lambda b: ("/sdapi/v1/txt2img", {"prompt": b["prompt"], "steps": b["steps"],
                                              "seed": b["seed"]}),
    "openai": lambda b: ("/v1/images/generations", {"prompt": b["prompt"], "steps": b["steps"],
                                                    "seed": b["seed"],
                                                    "response_format": "b64_json"}),
}  # fmt: skip


def _sse_block(block: bytes) -> tuple[str | None, bytes]:
    event, data = None, b""
    for line in block.split(b"\n"):
        if line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data += line[6:]
    return event, data


async def _drive(url, kind, clients: int, jobs: int, body: dict, pipe, step_by_step,
                 dialect: str = "ours") -> dict:  # fmt: skip
    """`clients` clients, `jobs` jobs each, then 1 s of /health; step_by_step: after each job,
    wait for the parent's go-ahead."""
    connect = RawHTTP if kind == "raw" else HttpxHTTP
    conns = [await connect(url).open() for _ in range(clients)]

    paused = 0.0

    async def client(c: int) -> list:
        nonlocal paused
        out = []
        for j in range(jobs):
            out.append(await conns[c].call(dialect, {**body, "seed": c * jobs + j}))
            if step_by_step:  # the parent redraws the job without the server meanwhile
                start = time.monotonic()
                pipe.send(("job", out[-1]))
                await asyncio.to_thread(pipe.recv)
                paused += time.monotonic() - start
        return out

    start = time.monotonic()
    results = await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.monotonic() - start - paused
    pipe.send(("jobs done", None))
    end, count = time.monotonic() + 1.0, 0

    async def health(c: int) -> None:
        nonlocal count
        while time.monotonic() < end:
            status, _ = await conns[c].json("GET", "/health")
            assert status == 200
            count += 1

    start = time.monotonic()
    await asyncio.gather(*(health(c) for c in range(clients)))
    rps = count / (time.monotonic() - start)
    for conn in conns:
        await conn.close()
    return {"wall": wall, "jobs": [r for rs in results for r in rs], "health_rps": rps}


def _client_main(url, kind, clients, jobs, body, pipe, step_by_step, dialect) -> None:
    out = asyncio.run(_drive(url, kind, clients, jobs, body, pipe, step_by_step, dialect))
    pipe.send(("result", out))


# ----- the parent: server, measurements, report -------------------------------------------------
def run_clients(url, kind, clients, jobs, body, on_job=None, dialect="ours") -> dict:
    """Run the clients in a spawned process; `on_job(result)` runs here after each job. Adds
    `server_cpu`: CPU seconds this process spent meanwhile (jobs only, not /health) in the
    worker threads and in the rest (`_cpu`), the parent's own redraws left out."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    args = (url, kind, clients, jobs, body, child, on_job is not None, dialect)
    proc = ctx.Process(target=_client_main, args=args, daemon=True)
    proc.start()
    cpu0, cpu = _cpu(), {}
    try:
        while True:
            if not parent.poll(600):
                raise RuntimeError("the client process did not answer in 600 s")
            what, value = parent.recv()
            if what == "result":
                return {**value, "server_cpu": cpu}
            if what == "jobs done":
                cpu = {k: b - a for (k, a), b in zip(cpu0.items(), _cpu().values(), strict=True)}
                continue
            on_job(value)
            parent.send("go")
    finally:
        proc.join(10)


def _cpu() -> dict[str, float]:
    """CPU seconds so far: the worker threads, and the rest of the process but this thread (the
    event loop and thread pool: HTTP and event streams; torch's own threads if it has some)."""
    import threading

    workers = 0.0
    for t in threading.enumerate():
        if t.name.startswith("latentforge-worker") and t.ident is not None:
            with contextlib.suppress(OSError, AttributeError):  # a thread that just ended
                workers += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    return {"workers": workers, "http": time.process_time() - time.thread_time() - workers}


def stats(values) -> dict:
    values = sorted(values)
    if not values:
        return {}

    def q(p: float) -> float:  # linear interpolation between closest ranks
        i = (len(values) - 1) * p
        lo, hi = math.floor(i), math.ceil(i)
        return values[lo] + (values[hi] - values[lo]) * (i - lo)

    return {k: round(v * 1e3, 2) for k, v in (("p50", q(0.5)), ("p95", q(0.95)),
                                              ("mean", statistics.fmean(values)))}  # fmt: skip


def split(results, queue) -> list[dict]:
    """Each job's client-seen time as exact parts (seconds), from the server's own timings and
    its queue/finish instants (time.monotonic is one clock across processes on Linux)."""
    rows = []
    for start, end, job in results:
        t = job["timings"]
        created = queue.get(job["id"]).created
        worked = created + t["queued_s"] + t["run_s"]
        row = {
            "client_seen": end - start,
            "sample": t["sample_s"],
            "submit": created - start,
            "queued": t["queued_s"],
            "previews": t["preview_s"],
            "encode": t["encode_s"],
            "other": t["run_s"] - t["sample_s"] - t["preview_s"] - t["encode_s"],
            "deliver": end - worked,
        }
        row["transport"] = row["submit"] + row["deliver"]
        row["overhead"] = row["client_seen"] - row["sample"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--tiny", action="store_true", help="train a 2-step digits model and use it")
    ap.add_argument("--clients", default="1,8", help="comma-separated client counts")
    ap.add_argument("--jobs", type=int, default=8, help="jobs per client")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--previews", default="on,off", help="on, off or on,off (request `preview`)")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw")
    ap.add_argument("--rows", action="store_true", help="also every job's parts (seconds)")
    ap.add_argument("--dialect", default=None, help="compare APIs per image: ours,a1111,openai")
    args = ap.parse_args(argv)

    import torch

    from latentforge.server import ServerConfig, create_app, schemas, tasks
    from latentforge.server.app import serve_in_thread

    model = args.model
    if args.tiny:
        from latentforge.training import TrainConfig, train_diffusion

        model = tempfile.mkdtemp(prefix="lf-bench-")
        cfg = TrainConfig(data="digits", out=model, cond="class", max_steps=2, batch_size=4,
                          sample_every=0, quiet=True)  # fmt: skip
        train_diffusion(cfg)
    clients = [int(c) for c in args.clients.split(",")]
    previews = [p == "on" for p in args.previews.split(",")]
    config = ServerConfig(model=model, workers=args.workers, max_queue=max(clients) + 1)
    app = create_app(config)
    store, queue = app.state.store, app.state.queue
    report: dict = {
        "model": store.default_name, "steps": args.steps, "workers": args.workers,
        "client": args.client, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "times": "milliseconds",
    }  # fmt: skip

    def bare(body: dict) -> float:
        """The same job without the server: the pipeline called directly, no callback."""
        req = schemas.Txt2ImgRequest(**body)
        task = tasks.txt2img(req, store, config, tasks.ImageDecoder.for_config(config))
        loaded = store.get(task.model)
        start = time.monotonic()
        with torch.no_grad():
            task.run(loaded, None)
        return time.monotonic() - start

    def per_job_entry(parts: list[dict]) -> dict:
        keys = ("client_seen", "sample", "overhead", "submit", "queued", "previews",
                "encode", "other", "deliver", "transport")  # fmt: skip
        return {"clients": 1, "jobs": len(parts), **{k: stats(p[k] for p in parts) for k in keys}}

    per_job: dict = {}
    rows, raw_rows = [], []
    with serve_in_thread(app) as url:
        base = {"prompt": "7", "steps": args.steps}
        run_clients(url, args.client, 1, 1, base)  # warm-up: loads the model
        bare({**base, "seed": 0})
        for dialect in args.dialect.split(",") if args.dialect else ():
            run_clients(url, args.client, 1, 1, base, dialect=dialect)  # warm-up
            found: list[dict] = []

            def newest(result, found=found):  # a synchronous dialect's job: the last queued
                found.append(next(reversed(queue._jobs.values())).snapshot(images=False))

            out = run_clients(url, args.client, 1, args.jobs, base, newest, dialect)
            results = [(s, e, job or f) for (s, e, job), f in zip(out["jobs"], found, strict=True)]
            parts = split(results, queue)
            per_job[dialect] = per_job_entry(parts)
            raw_rows.append({"dialect": dialect, "jobs": parts})
        for preview in previews if not args.dialect else ():
            body = base if preview else {**base, "preview": False}
            for n in clients:
                redraws: list[float] = []
                on_job = None
                if n == 1:  # one job at a time: redraw each without the server

                    def on_job(result, body=body, redraws=redraws):
                        redraws.append(bare({**body, "seed": result[2]["parameters"]["seed"]}))

                out = run_clients(url, args.client, n, args.jobs, body, on_job)
                failed = [job["error"] for _, _, job in out["jobs"] if job["status"] != "done"]
                if failed:
                    raise SystemExit(f"jobs failed: {failed[:3]}")
                parts = split(out["jobs"], queue)
                raw_rows.append({"clients": n, "previews": preview, "jobs": parts})
                samples = [p["sample"] for p in parts]
                service = out["wall"] * args.workers / len(parts)
                rows.append({
                    "clients": n, "previews": preview, "jobs": len(parts),
                    "jobs_per_s": round(len(parts) / out["wall"], 3),
                    "latency": stats(p["client_seen"] for p in parts),
                    "sample": stats(samples),
                    "service_overhead": round((service - statistics.fmean(samples)) * 1e3, 2),
                    "cpu_per_job": {k: round(v / len(parts) * 1e3, 2)
                                    for k, v in out["server_cpu"].items()},
                    "health_requests_per_s": round(out["health_rps"], 1),
                })  # fmt: skip
                if n == clients[0]:
                    entry = {**per_job_entry(parts), "clients": n}
                    if redraws:
                        entry["bare_sample"] = stats(redraws)
                        slow = [p["sample"] - b for p, b in zip(parts, redraws, strict=True)]
                        entry["sampler_slowdown"] = stats(slow)
                    per_job["previews_on" if preview else "previews_off"] = entry
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["dialects" if args.dialect else "per_job"] = per_job
    report["throughput"] = rows
    if args.rows:
        report["rows"] = raw_rows
    text = json.dumps(report, indent=2)
    # one line per {p50, p95, mean}
    text = re.sub(r"\{\s+(\"p50\"[^{}]*?)\s+\}", lambda m: "{" + " ".join(m[1].split()) + "}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
