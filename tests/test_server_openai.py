"""The OpenAI dialect (/v1/images, issue 29) with the real `openai` client against a live
`latentforge serve --api-key`, and hostile input in OpenAI's error shape."""

import base64
import io
import json
import shutil
import urllib.request

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from conftest import limited_client, live_serve  # noqa: E402

from latentforge.io import a1111  # noqa: E402

KEY = "s3cret"


@pytest.fixture(scope="module")
def models_dir(tiny_digits_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-models")
    (root / "digits").mkdir()
    for f in ("model.json", "model.safetensors"):
        shutil.copy(tiny_digits_model / f, root / "digits" / f)
    return root


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai-serve") / "serve.log"
    with live_serve(["--models-dir", str(models_dir), "--api-key", KEY, "--quiet"], log) as (_, u):
        yield u


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_generate_b64_json(client):
    extra = {"seed": 4, "steps": 3}  # latentforge's own fields
    r = client.images.generate(model="digits", prompt="3", n=2, size="16x16",
                               response_format="b64_json", extra_body=extra)  # fmt: skip
    assert len(r.data) == 2 and r.data[0].revised_prompt == "3"
    images = [decode(d.b64_json) for d in r.data]
    assert all(im.size == (16, 16) for im in images)
    seeds = [a1111.parse_parameters(im.info["parameters"])["Seed"] for im in images]
    assert seeds == ["4", "5"]
    # OpenAI's own model names mean the server's default model: the same image
    again = client.images.generate(model="dall-e-3", prompt="3", response_format="b64_json",
                                   extra_body={"seed": 4, "steps": 3})  # fmt: skip
    assert np.array_equal(np.asarray(decode(again.data[0].b64_json)), np.asarray(images[0]))


def test_generate_url_is_served_by_the_server(client, server):
    r = client.images.generate(prompt="5", size="auto", extra_body={"steps": 2})
    url = r.data[0].url
    assert url.startswith(f"{server}/files/")
    with urllib.request.urlopen(url, timeout=10) as f:  # no key: the URL itself is the secret
        img = Image.open(io.BytesIO(f.read()))
    assert img.size == (16, 16) and "parameters" in img.info


def test_edit_with_a_mask_keeps_the_opaque_part(client):
    r = client.images.generate(prompt="1", response_format="b64_json",
                               extra_body={"steps": 3, "seed": 1})  # fmt: skip
    base = decode(r.data[0].b64_json).convert("RGB")
    mask = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 8))  # transparent top half: redraw it
    r = client.images.edit(image=("base.png", png_bytes(base), "image/png"),
                           mask=("mask.png", png_bytes(mask), "image/png"), prompt="8",
                           response_format="b64_json")  # fmt: skip
    out, before = np.asarray(decode(r.data[0].b64_json).convert("RGB")), np.asarray(base)
    assert np.array_equal(out[8:], before[8:]) and not np.array_equal(out, before)


def test_variation(client):
    base = Image.new("RGB", (16, 16), (200, 30, 30))
    r = client.images.create_variation(image=("v.png", png_bytes(base), "image/png"), n=2,
                                       response_format="b64_json")  # fmt: skip
    assert [decode(d.b64_json).size for d in r.data] == [(16, 16)] * 2


def test_bad_requests_raise_the_right_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="3", size="7x7")
    assert e.value.status_code == 400 and e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="3", n=100)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="3", model="no-such-model")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # no mask, no transparency
        client.images.edit(image=("x.png", png_bytes(Image.new("RGB", (16, 16))), "image/png"),
                           prompt="1")  # fmt: skip
    assert e.value.body["param"] == "mask"
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.images.generate(prompt="3")
    assert e.value.body["code"] == "invalid_api_key"


def test_models_in_both_shapes(client, server):
    assert [m.id for m in client.models.list()] == ["digits"]  # the SDK: OpenAI's list
    request = urllib.request.Request(f"{server}/v1/models", headers={"X-API-Key": KEY})
    with urllib.request.urlopen(request, timeout=10) as f:  # anyone else: latentforge's
        ours = json.load(f)
    assert ours[0]["name"] == "digits" and "size_multiple" in ours[0]
    request = urllib.request.Request(f"{server}/openai/v1/models",
                                     headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as f:
        assert json.load(f)["data"][0]["id"] == "digits"


# ----- hostile input: 4xx in OpenAI's shape, never 5xx (in process) -----------------------------
@pytest.fixture(scope="module")
def local(models_dir):
    with limited_client(models_dir) as c:
        yield c


def form(image: bytes | None = None, **fields):
    files = {} if image is None else {"image": ("a.png", image, "image/png")}
    return {"files": files, "data": fields}


@pytest.mark.parametrize(
    "route, kwargs, status, param",
    [
        ("generations", {"json": {"prompt": "3", "steps": 10**6}}, 400, "steps"),
        ("generations", {"json": {"prompt": ""}}, 400, "prompt"),
        ("generations", {"json": {"prompt": "a (red circle"}}, 400, "prompt"),
        ("generations", {"json": {"prompt": 3}}, 400, "prompt"),
        ("generations", {"json": {"prompt": "3", "size": "4000x4000"}}, 400, "size"),
        ("generations", {"json": {"prompt": "3", "size": "big"}}, 400, "size"),
        ("generations", {"json": {"prompt": "3", "response_format": "gif"}}, 400,
         "response_format"),
        ("generations", {"json": {"prompt": "3", "model": "../x"}}, 400, None),
        ("generations", {"content": b"{not json", "headers": {"content-type":
                                                               "application/json"}}, 400, None),
        ("edits", {"json": {"prompt": "x"}}, 400, None),
        ("edits", form(None, prompt="x"), 400, None),  # not multipart
        ("edits", {"files": {"mask": ("m.png", b"x", "image/png")}, "data": {"prompt": "x"}},
         400, "image"),
        ("edits", form(b"\x89PNG junk", prompt="x"), 400, None),
        ("edits", form(png_bytes(Image.new("RGBA", (100, 100))), prompt="x"), 413, None),
        ("variations", form(png_bytes(Image.new("RGB", (16, 16))), n="many"), 400, "n"),
        ("variations", form(png_bytes(Image.new("RGB", (16, 16))), n="99"), 400, "n"),
    ],
)  # fmt: skip
def test_hostile_input_gets_openai_errors(local, route, kwargs, status, param):
    r = local.post(f"/v1/images/{route}", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_limits_hold_on_the_openai_routes(local):
    r = local.post("/v1/images/generations", content=b"x" * 300_000)
    assert r.status_code == 413 and "error" in r.json()
    assert local.post("/v1/txt2img", json={"prompt": "1"}).status_code == 202  # fills the queue
    r = local.post("/v1/images/generations", json={"prompt": "1"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
