"""HTTP server overhead and throughput; prints JSON.

    python bench/server.py [--model DIR] [--clients 1,4,16] [--jobs 8] [--steps 2] [--workers 1]

Runs the real app under uvicorn in this process and drives it over HTTP:
  per_job:    where a job's time goes, from the server's own timings (queue wait, model load,
              sampler, live previews, PNG encoding) and as the client sees it (POST -> final
              event); overhead = client-seen latency - time in the sampler.
  throughput: at N concurrent clients, completed jobs/s (each client: submit, follow the event
              stream to the end, repeat) and /health requests/s (the HTTP floor).
`--model` defaults to the embedded model; `--tiny` trains a 2-step digits model first (~5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time


async def follow(http, body: dict) -> tuple[float, dict]:
    """Submit a job and read its event stream to the end: (client-seen seconds, final job)."""
    start = time.perf_counter()
    r = await http.post("/v1/txt2img", json=body)
    r.raise_for_status()
    job_id = r.json()["id"]
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        event = None
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("done", "failed", "cancelled"):
                return time.perf_counter() - start, json.loads(line[6:])
    raise RuntimeError(f"event stream of {job_id} ended without a final event")


async def jobs_at(url: str, clients: int, jobs: int, steps: int) -> tuple[float, list]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def client(c: int) -> list:
            out = []
            for j in range(jobs):
                out.append(
                    await follow(http, {"prompt": "7", "steps": steps, "seed": c * jobs + j})
                )
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        return time.perf_counter() - start, [r for rs in results for r in rs]


async def health_rps(url: str, clients: int, seconds: float = 1.0) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        end, count = time.perf_counter() + seconds, 0

        async def client():
            nonlocal count
            while time.perf_counter() < end:
                (await http.get("/health")).raise_for_status()
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return count / (time.perf_counter() - start)


def mean(values) -> float:
    values = list(values)
    return round(statistics.fmean(values), 5) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--tiny", action="store_true", help="train a 2-step digits model and use it")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--jobs", type=int, default=8, help="jobs per client")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from latentforge.server import ServerConfig, create_app
    from latentforge.server.app import serve_in_thread

    model = args.model
    if args.tiny:
        from latentforge.training.loop import TrainConfig, train_diffusion

        model = tempfile.mkdtemp(prefix="lf-bench-")
        cfg = TrainConfig(data="digits", out=model, cond="class", max_steps=2, batch_size=4,
                          sample_every=0, quiet=True)  # fmt: skip
        train_diffusion(cfg)
    clients = [int(c) for c in args.clients.split(",")]
    config = ServerConfig(model=model, workers=args.workers, max_queue=max(clients) + 1)
    app = create_app(config)
    report: dict = {"model": app.state.store.default_name, "steps": args.steps,
                    "workers": args.workers, "torch_threads": torch.get_num_threads()}  # fmt: skip
    with serve_in_thread(app) as url:
        asyncio.run(jobs_at(url, 1, 1, args.steps))  # warm-up: loads the model
        rows, per_job = [], []
        for n in clients:
            wall, results = asyncio.run(jobs_at(url, n, args.jobs, args.steps))
            failed = [job["error"] for _, job in results if job["status"] != "done"]
            if failed:
                raise SystemExit(f"jobs failed: {failed[:3]}")
            rps = asyncio.run(health_rps(url, n))
            jobs_per_s = round(len(results) / wall, 3)
            rows.append({"clients": n, "jobs": len(results), "jobs_per_s": jobs_per_s,
                         "health_requests_per_s": round(rps, 1)})  # fmt: skip
            if n == clients[0]:
                per_job = results
    t = [job["timings"] for _, job in per_job]
    seen = [latency for latency, _ in per_job]
    sample = mean(x["sample_s"] for x in t)
    report["per_job"] = {
        "clients": clients[0],
        "jobs": len(per_job),
        "queued_s": mean(x["queued_s"] for x in t),
        "sample_s": sample,
        "preview_s": mean(x["preview_s"] for x in t),
        "encode_s": mean(x["encode_s"] for x in t),
        "run_s": mean(x["run_s"] for x in t),
        "client_seen_s": mean(seen),
        "overhead_s": round(mean(seen) - sample, 5),
        "overhead_fraction": round((mean(seen) - sample) / max(mean(seen), 1e-9), 3),
    }
    report["throughput"] = rows
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
