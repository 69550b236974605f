"""LoRAs and embeddings in the server (issue 24): LoRAs by name from the loras folder in our API
and in A1111's `<lora:NAME:SCALE>` tags, fused for one job and restored bit for bit; the
embeddings folder loaded with the model; both recorded in the PNGs, and embeddings in the CLI's
PNGs too. Oracle: `latentforge.load` with the same files on the tiny random SD of conftest.py."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient
from PIL import Image
from test_server import wait

import latentforge
from latentforge.cli import main
from latentforge.io import a1111
from latentforge.io.checkpoint import file_digest
from latentforge.io.images import with_a1111
from latentforge.io.lora import LoraFileCache, key_names, lora_roots, read_lora, save_lora
from latentforge.io.model_folder import load_diffusion_model
from latentforge.models.lora import LoraFactors, target_layers
from latentforge.server import ServerConfig, create_app

WIDTH = 32  # the tiny CLIP's hidden size
JOB = {"prompt": "a shiny cat", "seed": 5, "steps": 2}


def _random_lora(model, path: Path, seed: int, rank: int = 4) -> Path:
    """A kohya LoRA on every attention projection of the U-Net and the text encoder."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for part, root in lora_roots(model).items():
        for name in target_layers(root):
            w = root.get_submodule(name).weight
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            factors[(part, name)] = LoraFactors(down, torch.randn(w.shape[0], rank, generator=g))
    save_lora(path, factors, "kohya")
    return path


@pytest.fixture(scope="module")
def folders(native, tmp_path_factory):
    """loras/ (style, other), embeddings/ (shiny fits the tiny CLIP; wide, 16 wide, does not)."""
    root = tmp_path_factory.mktemp("adapters")
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    model = load_diffusion_model(native)
    _random_lora(model, root / "loras" / "style.safetensors", seed=1)
    _random_lora(model, root / "loras" / "other.safetensors", seed=2, rank=2)
    torch.manual_seed(3)
    save_file({"emb_params": torch.randn(2, WIDTH)}, root / "embeddings" / "shiny.safetensors")
    save_file({"emb_params": torch.randn(1, 16)}, root / "embeddings" / "wide.safetensors")
    return root


@pytest.fixture(scope="module")
def client(native, folders):
    config = ServerConfig(model=native, loras_dir=folders / "loras", preload=False,
                          embeddings_dir=folders / "embeddings")  # fmt: skip
    with TestClient(create_app(config)) as c:
        yield c


def _run(client, endpoint: str = "txt2img", **body) -> dict:
    r = client.post(f"/v1/{endpoint}", json={**JOB, **body})
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    return job["images"][0]


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def oracle(native, folders):
    """What latentforge.load gives with the style LoRA at 0.8 (and the shiny embedding)."""
    style, shiny = (
        folders / "loras" / "style.safetensors",
        folders / "embeddings" / "shiny.safetensors",
    )
    pipe = latentforge.load(native, device="cpu", loras=[f"{style}:0.8"], embeddings=[str(shiny)])
    return _pixels(pipe(JOB["prompt"], seed=JOB["seed"], steps=JOB["steps"])[0])


def test_a_lora_applies_to_its_job_only(client, oracle):
    """plain, with the LoRA, plain again: the LoRA image is the library's, and the model is
    restored bit for bit afterwards; the PNG records the LoRA in both chunks."""
    plain = _run(client)
    styled = _run(client, loras=["style:0.8"])
    again = _run(client)
    assert np.array_equal(_pixels(_png(again["png"])), _pixels(_png(plain["png"])))
    got = _pixels(_png(styled["png"]))
    assert not np.array_equal(got, _pixels(_png(plain["png"])))
    assert np.array_equal(got, oracle)
    img = _png(styled["png"])
    assert json.loads(img.info["loras"]) == ["style:0.8"] == styled["parameters"]["loras"]
    assert "a shiny cat <lora:style:0.8>" in img.info["parameters"]
    assert "loras" not in plain["parameters"]


def test_two_loras_and_img2img(client):
    """Several LoRAs at once; img2img and inpaint take them too."""
    both = _run(client, loras=["style:0.5", "other"])
    assert both["parameters"]["loras"] == ["style:0.5", "other:1"]
    edited = _run(client, "img2img", image=both["png"], loras=["other:-1"])
    assert edited["parameters"]["loras"] == ["other:-1"]


def test_a1111_lora_tags(client, oracle):
    """A1111's tags pick the LoRA and leave the prompt; an unknown one is a 422 on `prompt`."""
    body = {"prompt": "a shiny cat <lora:style:0.8>", "seed": 5, "steps": 2}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = _png(r.json()["images"][0])
    assert np.array_equal(_pixels(img), oracle)
    assert a1111.parse_parameters(img.info["parameters"])["Prompt"] == body["prompt"]
    assert img.info["prompt"] == "a shiny cat"
    bad = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "<lora:../style:1>"})
    assert bad.status_code == 422 and bad.json()["field"] == "prompt"
    assert "'../style'" in bad.json()["detail"]
    names = [x["name"] for x in client.get("/sdapi/v1/loras").json()]
    assert names == ["other", "style"]


@pytest.mark.parametrize("name", ["../loras/style", "loras/style", "nope", "style:x", "..style"])
def test_lora_names_outside_the_listing_are_422(client, name):
    r = client.post("/v1/txt2img", json={**JOB, "loras": [name]})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "loras"] and repr(name) in err["msg"]


def test_no_loras_folder(native):
    config = ServerConfig(model=native, preload=False, workers=0)
    with TestClient(create_app(config)) as c:
        r = c.post("/v1/txt2img", json={**JOB, "loras": ["style"]})
    assert r.status_code == 422 and "no loras folder" in r.text


def test_lora_files_are_cached_by_mtime(native, folders, tmp_path):
    names = key_names(lora_roots(load_diffusion_model(native)))
    path = shutil.copy(folders / "loras" / "style.safetensors", tmp_path / "s.safetensors")
    cache = LoraFileCache()
    first = read_lora(path, names, cache)
    assert read_lora(path, names, cache).keys() == first.keys() and cache.reads == 1
    shutil.copy(folders / "loras" / "other.safetensors", path)
    os.utime(path, ns=(1, 1))  # another file, another mtime
    changed = read_lora(path, names, cache)
    assert cache.reads == 2
    some = next(iter(changed))
    assert changed[some].rank == 2 != first[some].rank


def test_embeddings_folder_is_loaded_and_recorded(client, folders, native):
    """The folder's embeddings work in every request (the one that does not fit is skipped)
    and the PNG names those the prompt uses, with A1111's TI hashes."""
    shiny = _run(client)
    digest = file_digest(folders / "embeddings" / "shiny.safetensors")[:12]
    img = _png(shiny["png"])
    assert json.loads(img.info["embeddings"]) == [f"shiny:{digest}"]
    assert f'TI hashes: "shiny: {digest}"' in img.info["parameters"]
    pipe = latentforge.load(native, device="cpu")
    plain = _pixels(pipe(JOB["prompt"], seed=5, steps=2)[0])  # "shiny" as plain text
    assert not np.array_equal(_pixels(img), plain)
    assert "embeddings" not in _png(_run(client, prompt="a cat")["png"]).info
    chunks = {"parameters": img.info["parameters"]}  # as A1111 would have written it
    assert json.loads(with_a1111(chunks)["embeddings"]) == [f"shiny:{digest}"]


def test_cli_records_embeddings_and_from_png_warns(native, folders, tmp_path, capsys):
    shiny = str(folders / "embeddings" / "shiny.safetensors")
    out = tmp_path / "out.png"
    argv = ["generate", "a shiny cat", "--model", str(native), "--steps", "2", "--quiet"]
    assert main([*argv, "--embedding", shiny, "--out", str(out)]) == 0
    digest = file_digest(shiny)[:12]
    assert json.loads(Image.open(out).info["embeddings"]) == [f"shiny:{digest}"]
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--quiet", "--out", str(again)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentforge: warning:") and f"shiny:{digest}" in err
    assert "\n" not in err
    assert not Image.open(again).info.get("embeddings")  # not used this time
    assert main(["generate", "--from-png", str(out), "--embedding", shiny, "--quiet",
                 "--out", str(again)]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""
    assert np.array_equal(_pixels(Image.open(again)), _pixels(Image.open(out)))


def test_web_ui_lora_picker(native, folders, tmp_path):
    """The web UI lists the LoRAs and embeddings, sends the picked LoRAs with their scales, and
    shows them in the result's caption (headless Chromium, as test_server_browser.py)."""
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    from conftest import live_serve
    from test_server_browser import CHROMIUM, CHROMIUM_ARGS

    args = ["--model", str(native), "--loras-dir", str(folders / "loras"),
            "--embeddings-dir", str(folders / "embeddings")]  # fmt: skip
    with live_serve(args, tmp_path / "serve.log") as (_, url), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        sync_api.expect(page.locator("#lora-name option")).to_have_count(2)
        sync_api.expect(page.locator("#embeddings")).to_contain_text("shiny")
        page.select_option("#lora-name", "style")
        page.fill("#lora-scale", "0.8")
        page.click("#lora-add")
        page.select_option("#lora-name", "other")
        page.fill("#lora-scale", "-0.5")
        page.click("#lora-add")
        page.click("#lora-list li:nth-child(2) button")  # removed again
        sync_api.expect(page.locator("#lora-list li")).to_have_count(1)
        page.fill("#prompt", JOB["prompt"])
        page.fill("#steps", "2")
        page.fill("#seed", "5")
        page.click("#generate")
        caption = page.locator("#gallery figcaption").first
        sync_api.expect(caption).to_contain_text("loras: style:0.8", timeout=60_000)
        browser.close()
    assert not errors, errors
