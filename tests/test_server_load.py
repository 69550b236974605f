"""Load: 50 concurrent clients against a queue of 8 over real HTTP (uvicorn in a thread).

Every accepted job completes, the rest get 429 with Retry-After, /health keeps answering during
the load, and memory stays bounded over repeated rounds (finished jobs are capped, RSS flat).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (uvicorn)")
httpx = pytest.importorskip("httpx")

from latentforge.server import ServerConfig, create_app  # noqa: E402
from latentforge.server.app import serve_in_thread  # noqa: E402

CLIENTS, QUEUE, KEEP = 50, 8, 16


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_client(http, i: int, start: asyncio.Event) -> tuple[int, str | None, str | None]:
    """(status of the POST, final job status or None, Retry-After or None)."""
    await start.wait()
    body = {"prompt": str(i % 10), "steps": 2, "seed": i}
    r = await http.post("/v1/txt2img", json=body)
    if r.status_code != 202:
        return r.status_code, None, r.headers.get("retry-after")
    job_id = r.json()["id"]
    while True:
        job = (await http.get(f"/v1/jobs/{job_id}", params={"preview": "false"})).json()
        if job["status"] in ("done", "failed", "cancelled"):
            assert job["status"] != "done" or len(job["images"]) == 1
            return 202, job["status"], None
        await asyncio.sleep(0.05)


async def one_round(base_url: str) -> dict:
    limits = httpx.Limits(max_connections=CLIENTS + 5)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        start, done = asyncio.Event(), asyncio.Event()
        health: list[tuple[int, float]] = []

        async def watch_health():
            await start.wait()
            while not done.is_set():
                t = time.monotonic()
                r = await http.get("/health")
                health.append((r.status_code, time.monotonic() - t))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_health())
        clients = [asyncio.create_task(one_client(http, i, start)) for i in range(CLIENTS)]
        await asyncio.sleep(0.05)
        start.set()
        results = await asyncio.gather(*clients)
        done.set()
        await watcher
    return {"results": results, "health": health}


@pytest.fixture(scope="module")
def server(tiny_digits_model):
    config = ServerConfig(model=tiny_digits_model, max_queue=QUEUE, workers=1, keep_finished=KEEP,
                          preview_interval=0.05)  # fmt: skip
    app = create_app(config)
    with serve_in_thread(app) as url:
        yield app, url


def test_50_clients_against_a_queue_of_8(server):
    app, url = server
    rss = []
    for _ in range(2):
        out = asyncio.run(one_round(url))
        codes = [code for code, _, _ in out["results"]]
        accepted = [status for code, status, _ in out["results"] if code == 202]
        assert set(codes) <= {202, 429}, codes
        assert QUEUE <= len(accepted) < CLIENTS  # the queue filled, the rest were refused
        assert accepted == ["done"] * len(accepted)  # every accepted job completed
        assert all(int(ra) >= 1 for code, _, ra in out["results"] if code == 429)
        # /health answered all through the load
        assert len(out["health"]) >= 2 and {code for code, _ in out["health"]} == {200}
        rss.append(rss_mb())
        assert app.state.queue.stats()["kept"] <= KEEP  # finished jobs are capped
    # after a warm-up round, another round does not grow memory (generous: allocator noise)
    assert rss[1] - rss[0] < 64, f"RSS grew from {rss[0]:.0f} to {rss[1]:.0f} MB"


def test_bench_server_reports_the_overhead_split(tiny_digits_model):
    """bench/server.py runs end to end; each job's overhead is exactly the sum of its parts."""
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "server.py"
    cmd = [sys.executable, str(bench), "--model", str(tiny_digits_model), "--clients", "1,2",
           "--jobs", "2", "--steps", "3", "--rows"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert set(report["per_job"]) == {"previews_on", "previews_off"}
    on = report["per_job"]["previews_on"]
    assert on["overhead"]["p50"] > 0 and on["bare_sample"]["p50"] > 0
    assert [(r["clients"], r["previews"]) for r in report["throughput"]] == [
        (1, True),
        (2, True),
        (1, False),
        (2, False),
    ]
    assert all(r["jobs_per_s"] > 0 and r["latency"]["p95"] > 0 for r in report["throughput"])
    parts = ("submit", "queued", "previews", "encode", "other", "deliver")
    for group in report["rows"]:
        for job in group["jobs"]:
            assert job["overhead"] == pytest.approx(sum(job[k] for k in parts), abs=1e-6)
            assert job["overhead"] == pytest.approx(job["client_seen"] - job["sample"], abs=1e-9)
            assert job["submit"] > 0 and job["deliver"] > 0
        if not group["previews"]:
            assert all(job["previews"] == 0 for job in group["jobs"])
