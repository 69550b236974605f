"""ControlNet generation against diffusers' StableDiffusionControlNetPipeline.

The tiny random SD folder of conftest.py (`sd_folder`, imported as `native`) with tiny random
ControlNets (`ControlNetModel.from_unet`, then perturbed so the zero convolutions are not zero)
runs in diffusers and in latentforge from the same initial latents, 4 steps, guidance 6, on a
32 px canvas (as tests/test_sd_pipeline.py, which explains the scheduler settings): one
ControlNet, two with their own scales (diffusers' MultiControlNetModel), control start / end,
guess mode. The decoded images agree to 1e-4.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import perturbed
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from latentforge.cli import main  # noqa: E402
from latentforge.errors import UserError  # noqa: E402
from latentforge.io.checkpoint import file_digest, write_json_atomic  # noqa: E402
from latentforge.io.controlnet import import_controlnet, load_controlnet  # noqa: E402
from latentforge.io.images import load_image, read_png_metadata, to_pil  # noqa: E402
from latentforge.io.model_folder import load_diffusion_model, read_model_meta  # noqa: E402
from latentforge.models.controlnet import ControlNet  # noqa: E402
from latentforge.pipelines import control as control_mod  # noqa: E402
from latentforge.pipelines.control import (  # noqa: E402
    Control,
    active_span,
    control_images,
    image_digest,
    open_control_image,
)
from latentforge.pipelines.generate import generate  # noqa: E402
from latentforge.pipelines.img2img import img2img  # noqa: E402

PROMPT = "a red cat"
STEPS, GUIDANCE, TOL = 4, 6.0, 1e-4
SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, {"set_alpha_to_one": True}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
}


@pytest.fixture(scope="module")
def sd(sd_folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)


@pytest.fixture(scope="module")
def controlnets(sd):
    """Two diffusers ControlNets copied from the U-Net, perturbed (seeds 3 and 4)."""
    torch.manual_seed(0)
    return [
        perturbed(
            diffusers.ControlNetModel.from_unet(
                sd.unet, conditioning_embedding_out_channels=(8, 16)
            ),
            seed,
        )
        for seed in (3, 4)
    ]


@pytest.fixture(scope="module")
def cn_folders(controlnets, tmp_path_factory):
    """The ControlNets saved by diffusers and imported: latentforge ControlNet folders."""
    folders = []
    for cn in controlnets:
        folder = tmp_path_factory.mktemp("controlnet")
        cn.save_pretrained(folder / "diffusers")
        import_controlnet(folder / "diffusers", folder / "native")
        folders.append(folder / "native")
    return folders


@pytest.fixture(scope="module")
def ours(cn_folders):
    return [load_controlnet(folder)[0] for folder in cn_folders]


@pytest.fixture(scope="module")
def model(native):
    """The imported model on a 32 px canvas (see tests/test_sd_pipeline.py)."""
    model = load_diffusion_model(native)
    data, latent = model.meta.data, model.meta.latent
    model.meta = model.meta.replace(
        data=dataclasses.replace(data, resolution=16),
        latent=dataclasses.replace(latent, image_resolution=32),
    )
    return model


@pytest.fixture(scope="module")
def inputs(model):
    g = torch.Generator().manual_seed(123)
    noise = torch.randn((1, *model.image_shape), generator=g)
    images = [torch.rand(1, 3, 32, 32, generator=g) for _ in range(2)]
    return noise, images


def _diffusers(sd, nets, scheduler_name, noise, images, **kw):
    cls, overrides = SCHEDULERS[scheduler_name]
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in sd.components.items() if k != "image_encoder"},
        controlnet=nets if len(nets) > 1 else nets[0],
    )
    pipe.scheduler = cls.from_config(sd.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT, image=images if len(nets) > 1 else images[0], num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, eta=0.0, latents=noise.clone(), height=32, width=32,
        output_type="pt", **kw,
    ).images  # fmt: skip
    return out * 2 - 1


def _ours(model, controls, sampler, noise, **kw):
    return generate(
        model, prompts=[PROMPT], num=1, steps=STEPS, guidance=GUIDANCE, sampler=sampler,
        spacing="leading", noise=noise, controls=controls, **kw,
    )  # fmt: skip


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_one_controlnet_matches_diffusers(sd, controlnets, ours, model, inputs, sampler):
    noise, images = inputs
    want = _diffusers(sd, controlnets[:1], sampler, noise, images,
                      controlnet_conditioning_scale=0.8)  # fmt: skip
    got = _ours(model, [Control(ours[0], images[0], scale=0.8)], sampler, noise)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)
    plain = _ours(model, [], sampler, noise)
    assert _max_diff(got, plain) > 100 * TOL  # the ControlNet changes the image


def test_two_controlnets_with_scales_and_spans_match_diffusers(
    sd, controlnets, ours, model, inputs
):
    noise, images = inputs
    want = _diffusers(
        sd, controlnets, "euler", noise, images, controlnet_conditioning_scale=[0.7, 1.3],
        control_guidance_start=[0.0, 0.25], control_guidance_end=[0.5, 1.0],
    )  # fmt: skip
    controls = [
        Control(ours[0], images[0], scale=0.7, start=0.0, end=0.5),
        Control(ours[1], images[1], scale=1.3, start=0.25, end=1.0),
    ]
    got = _ours(model, controls, "euler", noise)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)
    whole = _ours(model, [dataclasses.replace(c, start=0.0, end=1.0) for c in controls], "euler",
                  noise)  # fmt: skip
    assert _max_diff(got, whole) > 100 * TOL  # the spans matter


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_control_start_end_match_diffusers(sd, controlnets, ours, model, inputs, sampler):
    noise, images = inputs
    want = _diffusers(sd, controlnets[:1], sampler, noise, images,
                      control_guidance_start=0.25, control_guidance_end=0.75)  # fmt: skip
    got = _ours(model, [Control(ours[0], images[0], start=0.25, end=0.75)], sampler, noise)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)


def test_guess_mode_matches_diffusers(sd, controlnets, ours, model, inputs):
    noise, images = inputs
    want = _diffusers(sd, controlnets[:1], "ddim", noise, images, guess_mode=True)
    got = _ours(model, [Control(ours[0], images[0], guess_mode=True)], "ddim", noise)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)
    normal = _ours(model, [Control(ours[0], images[0])], "ddim", noise)
    assert _max_diff(got, normal) > 100 * TOL


def test_active_span_is_diffusers_keep_rule():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    assert active_span(sigmas, 0.0, 1.0) == (1.0, 8.0)
    assert active_span(sigmas, 0.25, 0.75) == (2.0, 4.0)
    assert active_span(sigmas, 0.3, 0.5)[0] == float("inf")  # keeps no step


def test_control_images_resize_rule_and_errors():
    image = torch.rand(1, 3, 64, 48)
    out = control_images(image, 2, (32, 32), 3)
    assert out.shape == (2, 3, 32, 32)
    ref = torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(out[1:], ref.clamp(0, 1))
    same = torch.rand(1, 3, 32, 32)
    assert torch.equal(control_images(same, 1, (32, 32), 3), same)  # the right size: as is
    assert control_images(torch.rand(1, 1, 8, 8), 1, (16, 16), 3).shape == (1, 3, 16, 16)
    for bad, match in [
        (torch.rand(3, 3, 8, 8), "3 control images for 2"),
        (torch.rand(1, 4, 8, 8), "4 channels"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating-point"),
        (torch.rand(8, 8), r"\(B, C, H, W\)"),
    ]:
        with pytest.raises(UserError, match=match):
            control_images(bad, 2, (16, 16), 3)
    huge = torch.empty(1, 3, 1, control_mod.MAX_CONTROL_PIXELS + 1)
    with pytest.raises(UserError, match="pixel limit"):
        control_images(huge, 1, (16, 16), 3)


def test_bad_controls_are_one_line_errors(model, ours, inputs):
    noise, images = inputs
    for control, match in [
        (Control(ours[0], images[0], start=0.8, end=0.2), "start < end"),
        (Control(ours[0], images[0], scale=float("inf")), "finite"),
    ]:
        with pytest.raises(UserError, match=match):
            _ours(model, [control], "euler", noise)
    pixel = ControlNet(dataclasses.replace(ours[0].control_config, embedding_channels=(8,)))
    with pytest.raises(UserError, match="brings control images down 1x"):
        _ours(model, [Control(pixel, images[0])], "euler", noise)


def test_img2img_with_a_zero_scale_control_is_plain_img2img(model, ours, inputs):
    """A control at scale 0 adds nothing (its rows are skipped), so the outputs are equal."""
    _, images = inputs
    start = images[1] * 2 - 1
    kw = {"prompts": [PROMPT], "steps": STEPS, "guidance": GUIDANCE, "strength": 0.5}
    plain = img2img(model, start, **kw)
    zero = img2img(model, start, controls=[Control(ours[0], images[0], scale=0.0)], **kw)
    assert torch.equal(plain, zero)
    controlled = img2img(model, start, controls=[Control(ours[0], images[0])], **kw)
    assert _max_diff(controlled, plain) > 100 * TOL


# ----- the command line ---------------------------------------------------------------------------
def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def sketch(tmp_path_factory):
    path = tmp_path_factory.mktemp("sketch") / "sketch.png"
    g = torch.Generator().manual_seed(7)
    Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).byte().numpy()).save(path)
    return path


def test_cli_generate_with_controlnets_records_them(native, cn_folders, ours, sketch, tmp_path,
                                                    capsys):  # fmt: skip
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "--model", str(native), "--steps", "2", "--device", "cpu",
            "--controlnet", str(cn_folders[0]), "--control", str(sketch),
            "--control-scale", "0.5", "--out", str(out), "--quiet"]  # fmt: skip
    assert _run(argv, capsys)[0] == 0
    records = json.loads(read_png_metadata(out)["controlnets"])
    assert [r["controlnet"] for r in records] == ["native"]
    assert records[0]["scale"] == 0.5 and records[0]["preprocess"] == "none"
    assert records[0]["sha256"] == file_digest(cn_folders[0] / "model.safetensors")
    # the same image as the library call on the same control image
    model = load_diffusion_model(native)
    image = open_control_image(sketch)
    assert records[0]["image"] == image_digest(image)
    pixels = torch.from_numpy(np.asarray(image) / 255.0).float().permute(2, 0, 1)[None]
    control = Control(ours[0], pixels, scale=0.5)
    want = generate(model, prompts=[PROMPT], steps=2, controls=[control])
    got = load_image(out)[None]
    assert (got - want).abs().max() <= 2 / 255 + 1e-6  # 8-bit rounding of the PNG


def test_cli_control_uses_the_model_default_controlnet(native, cn_folders, sketch, tmp_path,
                                                       capsys):  # fmt: skip
    argv = ["generate", PROMPT, "--steps", "1", "--device", "cpu", "--control", str(sketch),
            "--quiet"]  # fmt: skip
    code, err = _run([*argv, "--model", str(native), "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--controlnet" in err
    folder = tmp_path / "model"
    shutil.copytree(native, folder)
    shutil.copytree(cn_folders[0], folder / "controlnet-test")
    meta = read_model_meta(folder).with_defaults(controlnet="controlnet-test")
    write_json_atomic(folder / "model.json", meta.to_json())
    assert _run([*argv, "--model", str(folder), "--out", str(tmp_path / "b.png")], capsys)[0] == 0
    explicit = [*argv, "--model", str(folder), "--controlnet", str(cn_folders[0]),
                "--out", str(tmp_path / "c.png")]  # fmt: skip
    assert _run(explicit, capsys)[0] == 0
    assert load_image(tmp_path / "b.png").equal(load_image(tmp_path / "c.png"))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--controlnet", "{cn}"], "needs a control image"),
        (
            ["--control", "{sketch}", "--control", "{sketch}", "--controlnet", "{cn}"],
            "2 control images for 1 ControlNets",
        ),
        (
            [
                "--control",
                "{sketch}",
                "--controlnet",
                "{cn}",
                "--control-scale",
                "1",
                "--control-scale",
                "2",
                "--control-scale",
                "3",
            ],
            "3 scale values",
        ),
        (
            [
                "--control",
                "{sketch}",
                "--controlnet",
                "{cn}",
                "--control-start",
                "0.9",
                "--control-end",
                "0.1",
            ],
            "start < end",
        ),
        (["--control", "{bad}", "--controlnet", "{cn}"], "not a readable image"),
        (["--control", "{sketch}", "--controlnet", "{native}"], "not a ControlNet"),
    ],
)
def test_cli_control_errors_are_one_line(native, cn_folders, sketch, tmp_path, capsys, extra,
                                         match):  # fmt: skip
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    names = {"cn": cn_folders[0], "sketch": sketch, "bad": bad, "native": native}
    argv = ["generate", PROMPT, "--model", str(native), "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "x.png"), "--quiet"]  # fmt: skip
    argv += [a.format(**names) for a in extra]
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and match in err, err


def test_cli_img2img_and_inpaint_take_controls(native, cn_folders, sketch, tmp_path, capsys):
    common = ["--model", str(native), "--steps", "2", "--device", "cpu", "--quiet",
              "--controlnet", str(cn_folders[1]), "--control", str(sketch),
              "--control-preprocess", "scribble"]  # fmt: skip
    out = tmp_path / "i2i.png"
    assert _run(["img2img", str(sketch), PROMPT, *common, "--out", str(out)], capsys)[0] == 0
    assert json.loads(read_png_metadata(out)["controlnets"])[0]["preprocess"] == "scribble"
    mask = tmp_path / "mask.png"
    Image.new("L", (40, 48), 255).save(mask)
    out = tmp_path / "inpaint.png"
    argv = ["inpaint", str(sketch), str(mask), PROMPT, *common, "--out", str(out)]
    assert _run(argv, capsys)[0] == 0
    assert "controlnets" in read_png_metadata(out)


# ----- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(native, cn_folders, tmp_path_factory):
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi.testclient import TestClient

    from latentforge.server import ServerConfig, create_app

    root = tmp_path_factory.mktemp("controlnets")
    for i, folder in enumerate(cn_folders):
        shutil.copytree(folder, root / f"cn{i}")
    (root / "not-a-controlnet").mkdir()
    config = ServerConfig(model=native, controlnets_dir=root, preload=False)
    with TestClient(create_app(config)) as c:
        yield c


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _job(client, body: dict, endpoint: str = "/v1/txt2img") -> dict:
    from test_server import wait

    r = client.post(endpoint, json=body)
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"])
    assert job["status"] == "done", job
    return job["images"][0]


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_server_controls_match_the_library(client, native, ours, sketch):
    """A control image and a ControlNet by name: the library's image, recorded in the job's
    parameters and the PNG; the A1111 extension's request shape gives the same image."""
    body = {"prompt": PROMPT, "seed": 5, "steps": 2,
            "controls": [{"image": _b64(sketch), "controlnet": "cn0", "scale": 0.5}]}  # fmt: skip
    got = _job(client, body)
    model = load_diffusion_model(native)
    pixels = torch.from_numpy(np.asarray(open_control_image(sketch)) / 255.0).float()
    control = Control(ours[0], pixels.permute(2, 0, 1)[None], scale=0.5)
    want = generate(model, prompts=[PROMPT], steps=2, seed=5, controls=[control])
    diff = np.abs(_pixels(got["png"]).astype(int) - np.asarray(to_pil(want[0])).astype(int))
    assert diff.max() <= 1
    (record,) = got["parameters"]["controlnets"]
    assert record["controlnet"] == "cn0" and record["scale"] == 0.5
    assert json.loads(Image.open(io.BytesIO(base64.b64decode(got["png"]))).info["controlnets"])
    unit = {"input_image": _b64(sketch), "model": "cn0 [abc123]", "weight": 0.5,
            "module": "none", "guidance_start": 0.0, "guidance_end": 1.0}  # fmt: skip
    a1111 = {"prompt": PROMPT, "seed": 5, "steps": 2,
             "alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False}]}}}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=a1111)
    assert r.status_code == 200, r.text
    assert np.array_equal(_pixels(r.json()["images"][0]), _pixels(got["png"]))
    listed = client.get("/v1/controlnets").json()
    assert [c["name"] for c in listed] == ["cn0", "cn1"]


def test_server_img2img_takes_controls(client, sketch):
    body = {"prompt": PROMPT, "seed": 1, "steps": 2, "image": _b64(sketch),
            "controls": [{"image": _b64(sketch), "controlnet": "cn1", "start": 0.5}]}  # fmt: skip
    got = _job(client, body, "/v1/img2img")
    assert got["parameters"]["controlnets"][0]["start"] == 0.5


@pytest.mark.parametrize(
    ("unit", "status", "match"),
    [
        ({"controlnet": "../cn0"}, 422, "unknown ControlNet"),
        ({"controlnet": "not-a-controlnet"}, 422, "unknown ControlNet"),
        ({}, 422, "names no default ControlNet"),
        ({"controlnet": "cn0", "start": 0.6, "end": 0.4}, 422, "below end"),
        ({"controlnet": "cn0", "scale": 9}, 422, "less than or equal to 4"),
        ({"controlnet": "cn0", "image": "bm90IGFuIGltYWdl"}, 400, "not a readable"),
    ],
)
def test_server_bad_controls(client, sketch, unit, status, match):
    body = {"prompt": PROMPT, "steps": 1, "controls": [{"image": _b64(sketch), **unit}]}
    r = client.post("/v1/txt2img", json=body)
    assert r.status_code == status and match in r.text, r.text


def test_a1111_bad_module_is_named(client, sketch):
    unit = {"input_image": _b64(sketch), "model": "cn0", "module": "openpose"}
    body = {"prompt": PROMPT, "steps": 1, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and "openpose" in r.text


def test_web_ui_control_image(native, cn_folders, sketch, tmp_path):
    """The web UI lists the ControlNets, sends the chosen control image with its scale, and the
    result's parameters record it (headless Chromium, as test_server_browser.py)."""
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    from conftest import live_serve
    from test_server_browser import CHROMIUM, CHROMIUM_ARGS

    shutil.copytree(native, tmp_path / "models" / "tiny")
    shutil.copytree(cn_folders[0], tmp_path / "models" / "controlnets" / "cn0")
    args = ["--models-dir", str(tmp_path / "models")]
    with live_serve(args, tmp_path / "serve.log") as (_, url), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests: list[dict] = []
        page.on("request", lambda r: requests.append(r.post_data_json) if r.method == "POST" else 0)
        page.goto(url)
        sync_api.expect(page.locator("#control-net option")).to_have_count(2)
        page.set_input_files("#control-image", str(sketch))
        page.select_option("#control-net", "cn0")
        page.fill("#control-scale", "0.5")
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "2")
        page.click("#generate")
        caption = page.locator("#gallery figcaption").first
        sync_api.expect(caption).to_contain_text("steps: 2", timeout=60_000)
        browser.close()
    assert not errors, errors
    (unit,) = next(r for r in requests if r and "controls" in r)["controls"]
    assert unit["controlnet"] == "cn0" and unit["scale"] == 0.5
    assert unit["image"].startswith("data:image/png;base64,")


def test_python_api_takes_controls(native, ours, inputs):
    """`latentforge.load(...)` pipelines pass `controls=` through (text to image and img2img)."""
    import latentforge

    pipe = latentforge.load(native, device="cpu")
    _, images = inputs
    control = Control(ours[0], images[0])
    kw = {"steps": 2, "seed": 3, "output_type": "pt"}
    got = pipe(PROMPT, controls=[control], **kw)
    assert torch.equal(got, generate(pipe.model, prompts=[PROMPT], steps=2, seed=3,
                                     controls=[control]))  # fmt: skip
    assert not torch.equal(got, pipe(PROMPT, **kw))
    picture = to_pil(images[1][0] * 2 - 1)  # resized to the model by the API
    edited = pipe.img2img(picture, PROMPT, controls=[control], **kw)
    assert edited.shape == got.shape
