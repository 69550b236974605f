"""The A1111 dialect (/sdapi/v1, issue 29) with the real `webuiapi` client against a live
`latentforge serve` (basic auth on), and hostile input in A1111's error shape (TestClient)."""

import base64
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from conftest import limited_client, live_serve  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_server import make_superres_model  # noqa: E402

from latentforge import sampling  # noqa: E402
from latentforge.io import a1111  # noqa: E402
from latentforge.server import ServerConfig, create_app  # noqa: E402

SIZE = {"width": 16, "height": 16}  # the tiny digits model's own size


@pytest.fixture(scope="module")
def models_dir(tiny_digits_model, tmp_path_factory):
    """digits and other (two copies of the tiny model), sr2 (an x2 upscaler), loras/ with one
    file."""
    root = tmp_path_factory.mktemp("a1111-models")
    for name in ("digits", "other"):
        (root / name).mkdir()
        for f in ("model.json", "model.safetensors"):
            shutil.copy(tiny_digits_model / f, root / name / f)
    make_superres_model(tiny_digits_model, root / "sr2")
    (root / "loras").mkdir()
    (root / "loras" / "ink.safetensors").write_bytes(b"")
    (root / "loras" / "notes.txt").write_text("not a LoRA")
    return root


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("a1111-serve") / "serve.log"
    args = ["--models-dir", str(models_dir), "--api-auth", "user:pa:ss", "--quiet"]
    with live_serve(args, log) as (_, url):
        yield url


@pytest.fixture(scope="module")
def api(server):
    host, port = server.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username="user", password="pa:ss")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_txt2img_info_and_png_chunk(api):
    r = api.txt2img(prompt="3", steps=3, seed=11, sampler_name="DPM++ 2M", scheduler="karras",
                    cfg_scale=1.5, batch_size=2, **SIZE)  # fmt: skip
    assert len(r.images) == 2 and r.images[0].size == (16, 16)
    assert r.info["all_seeds"] == [11, 12] and r.info["seed"] == 11
    assert r.info["sampler_name"] == "DPM++ 2M Karras" and r.info["cfg_scale"] == 1.5
    assert r.info["sd_model_name"] == "digits" and r.parameters["prompt"] == "3"
    for img, seed, text in zip(r.images, (11, 12), r.info["infotexts"], strict=True):
        assert img.info["parameters"] == text  # the PNG's chunk is the infotext
        p = a1111.parse_parameters(text)
        assert (p["Seed"], p["Steps"], p["Size"]) == (str(seed), "3", "16x16")
        assert img.info["sampler"] == "dpmpp_2m" and img.info["spacing"] == "karras"  # ours too


def test_random_seed_is_reported_and_reproduces(api):
    first = api.txt2img(prompt="7", steps=3, seed=-1, sampler_name="Euler", **SIZE)
    seed = first.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and first.info["all_seeds"] == [seed]
    again = api.txt2img(prompt="7", steps=3, seed=seed, sampler_name="Euler", **SIZE)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    other = api.txt2img(prompt="7", steps=3, seed=seed + 1, sampler_name="Euler", **SIZE)
    assert not np.array_equal(pixels(first.image), pixels(other.image))


def test_img2img_and_inpaint(api):
    base = api.txt2img(prompt="1", steps=3, seed=3, sampler_name="Euler", **SIZE).image
    r = api.img2img(images=[base], prompt="8", steps=4, seed=1, denoising_strength=0.5,
                    sampler_name="DDIM", **SIZE)  # fmt: skip
    assert len(r.images) == 1 and r.images[0].size == (16, 16)
    assert a1111.parse_parameters(r.info["infotexts"][0])["Denoising strength"] == "0.5"
    # inpainting: the kept (black) half of the mask stays exactly as it was (no blur)
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    r = api.img2img(images=[base], mask_image=mask, mask_blur=0, prompt="8", steps=3,
                    denoising_strength=1.0, seed=2, **SIZE)  # fmt: skip
    out, before = pixels(r.image), pixels(base)
    assert np.array_equal(out[:, 8:], before[:, 8:]) and not np.array_equal(out, before)


def test_samplers_schedulers_and_model_switch(api):
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "UniPC", "DDIM"} <= set(names)
    for s in api.get_samplers():  # every name listed runs: it maps to a registered sampler
        assert a1111.sampler_from_a1111(s["name"])[0] in sampling.SAMPLERS
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    assert api.util_get_model_names() == ["digits", "other"]
    assert api.util_get_current_model() == "digits"
    api.util_set_model("other")
    try:
        assert api.util_get_current_model() == "other"
        r = api.txt2img(prompt="2", steps=2, seed=0, **SIZE)
        assert r.info["sd_model_name"] == "other"
        # override_settings picks a model for one call, as A1111's does
        r = api.txt2img(prompt="2", steps=2, seed=0, **SIZE,
                        override_settings={"sd_model_checkpoint": "digits"})  # fmt: skip
        assert r.info["sd_model_name"] == "digits"
    finally:
        api.util_set_model("digits")
    assert [x["name"] for x in api.get_loras()] == ["ink"]
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}


def test_progress_while_a_job_runs_then_interrupt(api):
    result = {}

    def run():  # the slowest job the server allows: many steps of a 2-call sampler
        result["r"] = api.txt2img(prompt="5", steps=200, sampler_name="Heun", batch_size=16,
                                  seed=0, **SIZE)  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        p = api.get_progress()
        if p["state"]["sampling_step"] > 0:
            break
        assert time.monotonic() < deadline, p
        time.sleep(0.01)
    assert 0 < p["progress"] <= 1 and p["state"]["sampling_steps"] == 200
    assert p["state"]["job_count"] == 1 and p["eta_relative"] >= 0
    api.interrupt()
    thread.join(60)
    r = result["r"]
    assert r.images == [] and r.info["interrupted"] is True
    assert api.get_progress()["state"]["job_count"] == 0


def test_upscale_with_an_upscaler(api):
    assert [u["name"] for u in api.get_upscalers()] == ["None", "sr2"]
    r = api.extra_single_image(Image.new("L", (16, 16), 128), upscaler_1="sr2")
    assert r.image.size == (32, 32)


def test_png_info_reads_both_formats(api):
    r = api.txt2img(prompt="4", steps=2, seed=5, **SIZE)
    got = api.png_info(r.image)
    assert got.info == r.info["infotexts"][0] and got.json["latentforge"]["seed"] == "5"


def test_basic_auth_is_required(server):
    host, port = server.removeprefix("http://").split(":")
    anonymous = webuiapi.WebUIApi(host=host, port=int(port))
    with pytest.raises(RuntimeError) as e:
        anonymous.txt2img(prompt="1", steps=2, **SIZE)
    assert e.value.args[0] == 401
    wrong = webuiapi.WebUIApi(host=host, port=int(port), username="user", password="nope")
    with pytest.raises(RuntimeError):
        wrong.txt2img(prompt="1", steps=2, **SIZE)


# ----- hostile input: 4xx in A1111's shape, never 5xx (in process) --------------------------------
@pytest.fixture(scope="module")
def client(models_dir):
    with limited_client(models_dir) as c:
        yield c


def png_b64(size=(16, 16)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    "route, body, status, field",
    [
        ("txt2img", {"steps": 10**6}, 422, "steps"),
        ("txt2img", {"seed": "abc"}, 422, "seed"),
        ("txt2img", {"seed": -2}, 422, "seed"),
        ("txt2img", {"cfg_scale": 1e308}, 422, "cfg_scale"),
        ("txt2img", {"prompt": "\ud800"}, 422, "prompt"),
        ("txt2img", {"prompt": "a (red circle"}, 422, "prompt"),
        ("txt2img", {"width": 4000, "height": 16}, 422, "width"),
        ("txt2img", {"width": 7, "height": 16}, 422, "width"),
        ("txt2img", {"batch_size": 16, "n_iter": 16}, 422, "batch_size"),
        ("txt2img", {"sampler_name": "DPM fast"}, 422, "sampler_name"),
        ("txt2img", {"scheduler": "Align Your Steps"}, 422, "scheduler"),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "../etc"}}, 400, None),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, 404, None),
        ("txt2img", [1, 2], 422, None),
        ("img2img", {"init_images": []}, 422, "init_images"),
        ("img2img", {"init_images": ["not base64!"]}, 400, None),
        ("img2img", {"init_images": [base64.b64encode(b"\x89PNG junk").decode()]}, 400, None),
        ("img2img", {"init_images": [png_b64((100, 100))]}, 413, None),
        ("img2img", {"init_images": [png_b64()], "mask": png_b64(),
                     "inpainting_mask_invert": 1}, 422, "inpainting_mask_invert"),
        ("options", {"sd_model_checkpoint": "nope"}, 404, "sd_model_checkpoint"),
        ("png-info", {"image": "%%%"}, 400, "image"),
        ("extra-single-image", {"image": png_b64(), "upscaler_1": "digits"}, 422, "model"),
    ],
)  # fmt: skip
def test_hostile_input_gets_a1111_errors(client, route, body, status, field):
    headers = {"content-type": "application/json"}  # json.dumps: lone surrogates escaped
    r = client.post(f"/sdapi/v1/{route}", content=json.dumps(body), headers=headers)
    assert r.status_code == status, r.text
    got = r.json()
    assert set(got) >= {"error", "detail", "body", "errors"}
    if field is not None:
        assert got["field"] == a1111_field(field)


def a1111_field(field: str) -> str:
    return {"model": "sd_model_checkpoint"}.get(field, field)


def test_limits_hold_on_the_a1111_routes(client):
    # the body limit: refused from the headers, in A1111's shape
    r = client.post("/sdapi/v1/txt2img", content=b"x" * 300_000)
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    # the queue bound: one job waits (no workers), the next A1111 call gets 429 at once
    assert client.post("/v1/txt2img", json={"prompt": "1"}).status_code == 202
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "1"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert json.loads(r.text)["error"] == "TooManyRequests"


def test_api_key_guards_the_a1111_routes(models_dir):
    """With --api-key only, /sdapi/* takes the key as a bearer token or as the basic-auth
    password (what A1111 clients can send); refusals are in A1111's shape."""
    config = ServerConfig(models_dir=models_dir, preload=False, workers=0, api_key="k3y")
    with TestClient(create_app(config)) as c:
        r = c.get("/sdapi/v1/samplers")
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
        assert r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/sdapi/v1/samplers", auth=("anyone", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("anyone", "k3y")).status_code == 200
        ok = c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200
        assert c.get("/v1/samplers", auth=("anyone", "k3y")).status_code == 401  # ours: no
