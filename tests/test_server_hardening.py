"""The server against hostile or careless clients: body limits counted as the body arrives,
cheap refusals before image decoding, a pixel cap read from the image header, bounded decodes,
a per-job work budget and timeout, slow clients, the Host header, non-finite knobs and results,
broken model folders, and the memory of a live `latentforge serve` under such requests."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import socket
import struct
import threading
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (uvicorn)")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from conftest import live_serve  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_server import field_of, make_client, wait  # noqa: E402

from latentforge.server import ServerConfig, create_app, tasks  # noqa: E402
from latentforge.server.app import serve_in_thread  # noqa: E402

BROKEN = {  # model.json contents that must not load, and never break anything else
    "list": b"[]",
    "nested": b"[" * 100_000 + b"]" * 100_000,
    "kind": b'{"kind": "diffusion"}',
    "utf": b'{"kind": "\xff\xfe"}',
}


# ----- helpers ---------------------------------------------------------------------------------
def png_b64(size=(16, 16), mode="L", color=0) -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_header_only(width: int, height: int) -> str:
    """A PNG that claims width x height (8-bit grey) with one tiny IDAT: only its header is
    sound, which is all a size check may read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
    return base64.b64encode(raw + chunk(b"IEND", b"")).decode()


def add_broken_models(root: Path) -> None:
    for name, text in BROKEN.items():
        (root / name).mkdir()
        (root / name / "model.json").write_bytes(text)


@pytest.fixture(scope="module")
def models_dir(tiny_digits_model, tmp_path_factory):
    """models/digits (the tiny model), models/sr2 (an untrained x2 upscaler) and four folders
    whose model.json does not load."""
    from test_server import make_superres_model

    root = tmp_path_factory.mktemp("hardening") / "models"
    (root / "digits").mkdir(parents=True)
    for f in ("model.json", "model.safetensors"):
        shutil.copy(tiny_digits_model / f, root / "digits" / f)
    make_superres_model(tiny_digits_model, root / "sr2")
    add_broken_models(root)
    return root


@pytest.fixture(scope="module")
def client(models_dir):
    with make_client(models_dir) as c:
        yield c


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 20.0) -> bytes:
    """Send `head` (and `body`) over a plain socket, never finishing what it announces, and
    read whatever the server answers until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


# ----- body limits, before anything reads the body ---------------------------------------------
@pytest.fixture(scope="module")
def live(models_dir):
    """A keyed server in this process, with a small body limit and short timeouts."""
    config = ServerConfig(models_dir=models_dir, preload=False, workers=0, api_key="k3y",
                          max_body_bytes=100_000, body_timeout=0.5, header_timeout=0.5)  # fmt: skip
    with serve_in_thread(create_app(config)) as url:
        yield url


def test_chunked_body_is_refused_once_past_the_limit(live):
    """No Content-Length: the bytes are counted as they arrive, and the 413 comes as soon as
    they pass the limit (the body here never ends: a server that read it all would hang)."""
    head = (
        "POST /v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: k3y\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (50_000, b" " * 50_000)
    reply = raw_request(live, head, chunk * 3)  # 150 kB of an unfinished body
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"larger than 100000 bytes" in reply


def test_declared_length_over_the_limit_is_413_before_the_key(live):
    head = "POST /v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100001\r\n\r\n"
    assert raw_request(live, head).startswith(b"HTTP/1.1 413")


def test_api_key_is_checked_before_the_body_is_read(live):
    """A keyless request announcing a large chunked body gets its 401 without sending any."""
    head = (
        "POST /v1/img2img HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: application/json\r\n\r\n"
    )
    reply = raw_request(live, head)
    assert reply.startswith(b"HTTP/1.1 401") and b"www-authenticate: Bearer" in reply


def test_slow_body_gets_408_and_slow_headers_are_cut_off(live):
    head = (
        "POST /v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: k3y\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    reply = raw_request(live, head, b'{"steps": ')  # 10 of the 100 bytes, then nothing
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive in 0.5 s" in reply
    # half the headers, then nothing: uvicorn alone would keep this connection open forever
    reply = raw_request(live, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert reply.startswith(b"HTTP/1.1 408") and b"headers did not arrive" in reply
    with urllib.request.urlopen(f"{live}/health", timeout=10) as r:  # still serving
        assert json.load(r)["status"] == "ok"


# ----- cheap refusals first; images checked from their header ----------------------------------
def test_queue_full_and_missing_key_never_decode_an_image(models_dir, monkeypatch):
    def no_decode(*args, **kwargs):
        pytest.fail("an image was decoded for a request that is refused anyway")

    monkeypatch.setattr(tasks.ImageDecoder, "open", no_decode)
    monkeypatch.setattr(tasks.ImageDecoder, "tensor", no_decode)
    body = {"image": png_b64(), "steps": 2}
    with make_client(models_dir, workers=0, max_queue=1, api_key="k3y") as c:
        assert c.post("/v1/img2img", json=body).status_code == 401
        key = {"X-API-Key": "k3y"}
        assert c.post("/v1/txt2img", json={"steps": 2}, headers=key).status_code == 202
        r = c.post("/v1/img2img", json=body, headers=key)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_a_refused_request_gives_its_queue_place_back(models_dir):
    with make_client(models_dir, workers=0, max_queue=1) as c:
        bad = {"image": base64.b64encode(b"not an image").decode(), "steps": 2}
        assert c.post("/v1/img2img", json=bad).status_code == 400
        assert c.post("/v1/txt2img", json={"steps": 2000}).status_code == 422
        assert c.post("/v1/img2img", json={"image": png_b64(), "steps": 2}).status_code == 202
        assert c.post("/v1/txt2img", json={"steps": 2}).status_code == 429


def test_image_pixels_are_capped_from_the_header(models_dir):
    with make_client(models_dir, workers=0, max_image_pixels=300) as c:
        assert (
            c.post("/v1/img2img", json={"image": png_b64((16, 16)), "steps": 2}).status_code == 202
        )
        r = c.post("/v1/img2img", json={"image": png_b64((20, 16)), "steps": 2})
        assert r.status_code == 413, r.text
        assert "20x16 image (320 pixels)" in r.json()["detail"] and "300" in r.json()["detail"]
        # a header alone is enough to refuse (its pixels are never decompressed), JPEG too
        mask = png_header_only(64, 64)
        r = c.post("/v1/inpaint", json={"image": png_b64(), "mask": mask, "steps": 2})
        assert r.status_code == 413 and r.json()["detail"].startswith("mask: a 64x64 image")
        jpeg = io.BytesIO()
        Image.new("RGB", (40, 40)).save(jpeg, format="JPEG")
        body = {"image_a": png_b64(), "image_b": base64.b64encode(jpeg.getvalue()).decode()}
        r = c.post("/v1/interpolate", json=body)
        assert r.status_code == 413 and r.json()["detail"].startswith("image_b: a 40x40 image")
    with make_client(models_dir, workers=0) as c:
        # beyond PIL's own decompression-bomb limit (179 M pixels) and over a side
        for w, h in [(30_000, 30_000), (8192, 16)]:
            body = {"image": png_header_only(w, h), "steps": 2}
            r = c.post("/v1/img2img", json=body)
            assert r.status_code == 413 and r.json()["detail"].startswith("image: "), r.text


def test_decodes_run_at_most_max_decodes_at_a_time(monkeypatch):
    """Two decodes meet inside (a barrier of two), never three."""
    decoder = tasks.ImageDecoder(max_pixels=10**6, slots=2)
    inside, most, lock = 0, 0, threading.Lock()
    meet = threading.Barrier(2, timeout=20)
    real = tasks.from_pil

    def counting(img, channels):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        meet.wait()  # raises (and fails the test) unless two decodes run together
        with lock:
            inside -= 1
        return real(img, channels)

    monkeypatch.setattr(tasks, "from_pil", counting)
    with ThreadPoolExecutor(6) as pool:
        shapes = list(
            pool.map(lambda _: decoder.image(png_b64(), "image", None, 1).shape, range(6))
        )
    assert shapes == [(1, 1, 16, 16)] * 6 and most == 2


# ----- per-job budget ---------------------------------------------------------------------------
def test_jobs_over_the_work_budget_are_422_naming_steps(models_dir):
    with make_client(models_dir, workers=0, max_job_work=10_000) as c:
        assert c.post("/v1/txt2img", json={"steps": 39, "num": 1}).status_code == 202  # 9984
        r = c.post("/v1/txt2img", json={"steps": 10, "num": 4})  # 4 x 256 pixels x 10 steps
        assert field_of(r) == ["steps"]
        msg = r.json()["detail"][0]["msg"]
        assert "10,240 pixel-steps (10 steps x 4 images of 16x16" in msg and "10,000" in msg
        r = c.post("/v1/upscale", json={"image": png_b64((8, 8)), "steps": 50})  # 1 tile of 16x16
        assert field_of(r) == ["steps"] and "1 tiles of 16x16" in r.json()["detail"][0]["msg"]
        walk = {"seed_a": 0, "seed_b": 1, "frames": 8, "steps": 4}
        assert c.post("/v1/interpolate", json=walk).status_code == 202  # 8 x 256 x 4
        assert field_of(c.post("/v1/interpolate", json={**walk, "frames": 10})) == ["steps"]


def test_default_budget_lets_ui_requests_through_and_refuses_a_big_upscale():
    """With the embedded models: a 128 px image through the x4 upscaler and the largest
    text-to-image request the UI offers pass; a 256 px upscale at default steps does not."""
    with TestClient(create_app(ServerConfig(preload=False, workers=0, max_queue=4))) as c:
        ok = {"prompt": "a red circle", "num": 16, "steps": 200, "width": 128, "height": 128}
        assert c.post("/v1/txt2img", json=ok).status_code == 202
        rgb = {"size": (128, 128), "mode": "RGB"}
        assert c.post("/v1/upscale", json={"image": png_b64(**rgb)}).status_code == 202
        big = c.post("/v1/upscale", json={"image": png_b64((256, 256), "RGB")})
        assert field_of(big) == ["steps"] and "441 tiles of 64x64" in big.json()["detail"][0]["msg"]


def test_a_job_past_the_timeout_fails_with_the_reason(models_dir):
    with make_client(models_dir, job_timeout=1e-3) as c:
        job = wait(c, c.post("/v1/txt2img", json={"steps": 50}).json()["id"])
    assert job["status"] == "failed" and "job_timeout" in job["error"] and not job["images"]


# ----- non-finite knobs and results -------------------------------------------------------------
@pytest.mark.parametrize(
    "endpoint, text, field, named",
    [
        ("txt2img", '{"knobs": {"s_noise": 1e308}, "sampler": "euler"}', "knobs", "s_noise"),
        ("txt2img", '{"knobs": {"eta": NaN}}', "knobs", "eta"),
        ("txt2img", '{"knobs": {"eta": -0.5}}', "knobs", "eta"),
        ("txt2img", '{"knobs": {"s_churn": 1e400}}', "knobs", "s_churn"),
        ("txt2img", '{"knobs": {"s_tmin": 10000000000000000000000000}}', "knobs", "s_tmin"),
        ("txt2img", '{"guidance": Infinity}', "guidance", "finite"),
        ("txt2img", '{"guidance_interval": [0, Infinity]}', 1, "finite"),
        ("img2img", '{"image": "AAAA", "strength": NaN}', "strength", "finite"),
        ("upscale", '{"image": "AAAA", "noise_level": -Infinity}', "noise_level", "finite"),
    ],
)
def test_non_finite_or_out_of_range_knobs_are_422(client, endpoint, text, field, named):
    r = client.post(f"/v1/{endpoint}", content=text, headers={"content-type": "application/json"})
    assert field_of(r) == [field]
    assert named in r.json()["detail"][0]["msg"]


def test_a_non_finite_result_fails_the_job(client, monkeypatch):
    from latentforge.pipelines import generate as gen

    monkeypatch.setattr(gen, "generate", lambda *a, **k: torch.full((1, 1, 16, 16), float("nan")))
    job = wait(client, client.post("/v1/txt2img", json={"steps": 2}).json()["id"])
    assert job["status"] == "failed" and "NaN" in job["error"] and not job["images"]


# ----- broken model folders ---------------------------------------------------------------------
def test_broken_model_folders_are_listed_and_refused_alone(client, models_dir, caplog):
    caplog.set_level(logging.WARNING, logger="latentforge.server")
    listed = {m["name"]: m for m in client.get("/v1/models").json()}
    assert sorted(listed) == ["digits", "kind", "list", "nested", "sr2", "utf"]
    assert listed["digits"]["status"] == "ok" and listed["digits"]["default"]
    for name in BROKEN:
        assert listed[name]["status"] == "broken" and not listed[name]["default"]
        assert str(models_dir) not in listed[name]["error"]  # no server paths
        r = client.post("/v1/txt2img", json={"model": name, "steps": 2})
        assert field_of(r) == ["model"] and "does not load" in r.json()["detail"][0]["msg"]
    assert "must be an object" in listed["list"]["error"] and "unet" in listed["kind"]["error"]
    # the others are unaffected, named or not
    for body in ({"steps": 2}, {"model": "digits", "steps": 2}):
        job = wait(client, client.post("/v1/txt2img", json=body).json()["id"])
        assert job["status"] == "done", job["error"]
    # a folder broken while the server runs; each broken file is logged once
    (models_dir / "late").mkdir()
    (models_dir / "late" / "model.json").write_text("{")
    try:
        for _ in range(2):
            late = [m for m in client.get("/v1/models").json() if m["name"] == "late"]
            assert late[0]["status"] == "broken"
        assert client.post("/v1/txt2img", json={"steps": 2}).status_code == 202
        late_logs = [r for r in caplog.records if str(models_dir / "late") in r.getMessage()]
        assert len(late_logs) == 1
    finally:
        shutil.rmtree(models_dir / "late")


# ----- the Host header --------------------------------------------------------------------------
def test_host_header_is_checked(models_dir):
    with make_client(models_dir, workers=0) as c:
        for host in ("localhost", "localhost:7860", "127.0.0.1:80", "[::1]:7860", "testserver"):
            assert c.get("/health", headers={"host": host}).status_code == 200, host
        r = c.get("/v1/models", headers={"host": "evil.example:7860"})
        assert r.status_code == 400 and "--allowed-host evil.example" in r.json()["detail"]
    with make_client(models_dir, workers=0, allowed_hosts=("ui.example",)) as c:
        assert c.get("/health", headers={"host": "UI.example."}).status_code == 200
        assert c.get("/health", headers={"host": "testserver"}).status_code == 400


@pytest.mark.parametrize(
    "host, allowed, names",
    [
        ("127.0.0.1", (), {"localhost", "127.0.0.1", "::1"}),
        ("localhost", ("a.example",), {"localhost", "127.0.0.1", "::1", "a.example"}),
        ("0.0.0.0", (), None),  # bound beyond loopback with no names: any (documented)
        (
            "192.168.1.5",
            ("a.example",),
            {"localhost", "127.0.0.1", "::1", "192.168.1.5", "a.example"},
        ),
        ("127.0.0.1", ("*",), None),
    ],
)
def test_host_names(host, allowed, names):
    assert ServerConfig(host=host, allowed_hosts=allowed).host_names() == names


# ----- a live `latentforge serve`: memory under hostile requests --------------------------------
def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture(scope="module")
def serve_process(models_dir, tmp_path_factory):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    log = tmp_path_factory.mktemp("serve-hardening") / "serve.log"
    args = ["--models-dir", str(models_dir), "--max-queue", "16", "--workers", "1", "--quiet"]
    with live_serve(args, log) as (proc, url):
        yield proc, url, log


def peak_growth_mb(pid: int, action) -> float:
    """How far the process's peak RSS rises above its RSS at rest while `action` runs."""
    clear = Path(f"/proc/{pid}/clear_refs")
    clear.write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    rest = vm_kb(pid, "VmRSS")
    action()
    return (vm_kb(pid, "VmHWM") - rest) / 1024


def test_serve_memory_stays_bounded_under_huge_images_and_bodies(serve_process, models_dir):
    proc, url, log = serve_process
    big = png_b64((4096, 4096))  # about 65 kB of base64, 16.8 M pixels
    assert len(big) < 100_000
    with httpx.Client(base_url=url, timeout=60) as http:
        # warm up: one real request of each kind, so lazy imports are not counted
        r = http.post("/v1/img2img", json={"image": png_b64(), "steps": 1})
        assert r.status_code == 202
        assert wait(http, r.json()["id"])["status"] == "done"
        assert http.post("/v1/img2img", json={"image": big}).status_code == 413
        # serve started with broken folders beside the good one, and lists them
        assert {m["status"] for m in http.get("/v1/models").json()} == {"ok", "broken"}
        # a name this server was not started for: refused (DNS rebinding)
        assert http.get("/health", headers={"host": "evil.example"}).status_code == 400

    codes: list[int] = []

    def flood():
        def one(_):
            with httpx.Client(base_url=url, timeout=60) as http:
                r = http.post("/v1/img2img", json={"image": big, "steps": 2})
                return r.status_code, r.json()["detail"]

        with ThreadPoolExecutor(16) as pool:
            for code, detail in pool.map(one, range(16)):
                codes.append(code)
                assert "4096x4096 image (16777216 pixels)" in detail and "4194304" in detail

    grew = peak_growth_mb(proc.pid, flood)
    assert codes == [413] * 16
    assert grew < 200, f"16 requests for 4096x4096 images raised the peak RSS by {grew:.0f} MB"
    print(f"\nserve peak RSS growth: 16 x 4096x4096 PNG {grew:.1f} MB", end="")

    def chunked():
        def body():
            for _ in range(32):
                yield b" " * 2**20

        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post(
                "/v1/txt2img", content=body(), headers={"content-type": "application/json"}
            )
        codes.append(r.status_code)

    grew = peak_growth_mb(proc.pid, chunked)
    assert codes[-1] == 413
    assert grew < 200, f"a chunked 32 MB body raised the peak RSS by {grew:.0f} MB"
    print(f", chunked 32 MB body {grew:.1f} MB")
    assert proc.poll() is None, log.read_text()
