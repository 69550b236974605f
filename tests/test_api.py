"""The Python API (`latentforge.load`) and the one settings object every pipeline takes."""

import math

import pytest
import torch
from PIL import Image

import latentforge
from latentforge.errors import UserError
from latentforge.guidance import Region
from latentforge.io.images import to_pil
from latentforge.io.model_folder import ModelFolder, default_model_dir, load_diffusion_model
from latentforge.pipelines.generate import generate
from latentforge.pipelines.settings import SampleSettings, SettingsError


@pytest.fixture(scope="module")
def pipe():
    return latentforge.load("default")


def test_pipe_returns_pil_images_equal_to_the_tensor_path(pipe):
    images = pipe("a red circle", num=2, seed=3, steps=3)
    assert len(images) == 2 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].size == (64, 64)
    tensors = generate(pipe.model, prompts=["a red circle"], num=2, seed=3, steps=3)
    assert [im.tobytes() for im in images] == [to_pil(t).tobytes() for t in tensors]
    assert torch.equal(pipe("a red circle", num=2, seed=3, steps=3, output_type="pt"), tensors)


def test_a_prompt_list_is_one_image_per_prompt_seeded_per_image(pipe):
    both = pipe(["a red circle", "a blue star"], seed=5, steps=3, output_type="pt")
    alone = pipe("a blue star", seed=6, steps=3, output_type="pt")
    assert both.shape[0] == 2
    # image i uses seed + i, whatever the batch; GEMMs blocked by batch size differ in float32
    # rounding (8e-5 on an AVX-512 AMD EPYC), far below one 8-bit level (7.8e-3)
    assert torch.allclose(both[1:], alone, atol=5e-4)


def test_settings_object_and_keywords_are_the_same_call(pipe):
    s = SampleSettings(sampler="euler_ancestral", steps=3, seed=2, knobs={"eta": 0.5})
    a = pipe("a green square", settings=s, output_type="pt")
    b = pipe("a green square", sampler="euler_ancestral", steps=3, seed=2, eta=0.5,
             output_type="pt")  # fmt: skip
    assert torch.equal(a, b)


def test_api_errors_are_one_line_user_errors(pipe):
    with pytest.raises(UserError, match="has no option"):
        pipe("a red circle", steps=2, frobnicate=1)
    with pytest.raises(UserError, match="output_type"):
        pipe("a red circle", steps=1, output_type="numpy")
    with pytest.raises(UserError, match="upscale"):
        latentforge.load("upscaler")("a red circle")
    with pytest.raises(UserError, match="not found"):
        latentforge.load("no/such/folder")


def test_editing_methods_take_pil_images(pipe):
    image = pipe("a red circle", steps=2)[0]
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 32))
    kept = pipe.inpaint(image, mask, "a red circle", steps=2, output_type="pt")
    source = torch.tensor(list(image.getdata()), dtype=torch.float32).view(64, 64, 3)
    # kept pixels are the input's exactly (paste-back in pixel space)
    got = ((kept[0].permute(1, 2, 0) + 1) * 127.5).round()
    assert torch.equal(got[40:, 40:], source[40:, 40:])
    assert pipe.img2img(image, "a blue circle", strength=0.0)[0].tobytes() == image.tobytes()


# ----- SampleSettings -------------------------------------------------------------------------
def test_build_splits_fields_from_sampler_knobs():
    s = SampleSettings.build(steps=4, eta=0.3, bf16=True, guidance=None, regions=[])
    assert (s.steps, s.guidance, s.precision, dict(s.knobs)) == (4, None, "bf16", {"eta": 0.3})
    t = SampleSettings.build(s, knobs={"s_noise": 1.0}, seed=9)
    assert dict(t.knobs) == {"eta": 0.3, "s_noise": 1.0} and t.seed == 9 and t.steps == 4


def test_resolve_fills_the_models_defaults():
    view = ModelFolder.read(default_model_dir())
    s = SampleSettings().resolve(view)
    d = view.defaults
    assert (s.sampler, s.steps, s.spacing, s.guidance) == (d.sampler, d.steps, "trailing", 3.0)
    assert s.guidance_interval == (1.0, None) and s.layout == "shapes"
    # explicit values win; regions replace the planner; (0, inf) is stored as (0, None)
    box = Region("a red star", (0.0, 0.0, 0.5, 0.5))
    t = SampleSettings(steps=5, guidance_interval=(0, math.inf), regions=(box,)).resolve(view)
    assert (t.steps, t.guidance_interval, t.layout) == (5, (0.0, None), "none")
    assert t.resolve(view) == t  # resolving twice changes nothing


def test_resolve_names_the_field_it_rejects(tiny_digits_model):
    text = ModelFolder.read(default_model_dir())
    digits = ModelFolder.read(tiny_digits_model)
    cases = [
        (SampleSettings(sampler="nope"), text, "sampler"),
        (SampleSettings(steps=0), text, "steps"),
        (SampleSettings(guidance=float("nan")), text, "guidance"),
        (SampleSettings(guidance_interval=(3.0, 1.0)), text, "guidance_interval"),
        (SampleSettings(num=0), text, "num"),
        (SampleSettings(knobs={"eta": 1.0}), text, None),  # ddim takes eta
        (SampleSettings(sampler="heun", knobs={"eta": 1.0}), text, "knobs"),
        (SampleSettings(knobs={"eta": float("nan")}), text, "knobs"),
        (SampleSettings(sampler="euler_ancestral", knobs={"s_noise": 1e308}), text, "knobs"),
        (SampleSettings(layout="cubism"), text, "layout"),
        (SampleSettings(regions=(Region("a", (0, 0, 1, 1)),)), digits, "regions"),
        (SampleSettings(precision="fp8"), text, "precision"),
    ]
    for settings, model, field in cases:
        if field is None:
            settings.resolve(model)
            continue
        with pytest.raises(SettingsError) as e:
            settings.resolve(model)
        assert e.value.field == field, (settings, str(e.value))
    # models without a text encoder plan no layout
    assert SampleSettings(layout="shapes").resolve(digits).layout == "none"


def test_png_meta_round_trip():
    view = ModelFolder.read(default_model_dir())
    s = SampleSettings(
        sampler="dpmpp_2m", steps=7, negative="a blue star", seed=4, num=3, precision="bf16",
        regions=(Region("a red circle", (0.1, 0.2, 0.6, 0.7)),), knobs={"final_step": "euler"},
    ).resolve(view)  # fmt: skip
    meta = s.to_png_meta()
    assert all(isinstance(v, str) for v in meta.values())
    assert SampleSettings.from_png_meta(meta) == s
    # PNGs from before layouts and precisions: layout none, fp32
    old = {k: v for k, v in meta.items() if k not in ("layout", "precision", "regions")}
    back = SampleSettings.from_png_meta(old)
    assert (back.layout, back.precision, back.regions) == ("none", "fp32", ())
    with pytest.raises(UserError, match="no latentforge generate parameters"):
        SampleSettings.from_png_meta({"prompt": "x"})
    with pytest.raises(UserError, match="unreadable"):
        SampleSettings.from_png_meta({**meta, "steps": "many"})


def test_every_pipeline_takes_the_same_settings(tiny_digits_model):
    """generate, img2img at strength 1, inpaint with an all-ones mask and one settings object:
    the same images (strength 1 is text-to-image, bit for bit)."""
    from latentforge.pipelines.img2img import img2img
    from latentforge.pipelines.inpaint import inpaint

    model = load_diffusion_model(tiny_digits_model)
    s = SampleSettings(steps=3, seed=11, num=2, guidance=2.0)
    base = generate(model, s, labels=[7])
    images = torch.zeros(2, *model.output_shape)
    assert torch.equal(img2img(model, images, s, strength=1.0, labels=[7]), base)
    ones = torch.ones(2, 1, *model.output_shape[1:])
    assert torch.equal(inpaint(model, images, ones, s, labels=[7]), base)


@pytest.mark.parametrize(("width", "height"), [(96, 64), (64, 96)])
def test_other_sizes_on_the_embedded_model_reproduce_from_png(tmp_path, width, height):
    """--width / --height: the output size, regions laid on its grid, recorded in the PNG and
    reproduced from it bit for bit."""
    from latentforge.pipelines.generate import generate_to_png, settings_from_png

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact at one thread count (tests/test_model_folder.py)
    try:
        prompt = "a small red circle above a blue square"
        first = tmp_path / "first.png"
        generate_to_png(None, first, prompt=prompt, width=width, height=height, steps=3, num=2)
        prompt_back, settings, _ = settings_from_png(first)
        assert (settings.width, settings.height, settings.layout) == (width, height, "shapes")
        again = tmp_path / "again.png"
        generate_to_png(None, again, prompt=prompt_back, settings=settings)
    finally:
        torch.set_num_threads(threads)
    a, b = Image.open(first), Image.open(again)
    assert a.tobytes() == b.tobytes()
    assert a.size == (2 * width + 6, height + 4)  # a grid of two, 2 px padding (save_grid)


def test_sizes_the_model_cannot_take_name_the_side():
    view = ModelFolder.read(default_model_dir())
    with pytest.raises(SettingsError, match="multiple of 16") as e:
        SampleSettings(width=72).resolve(view)
    assert e.value.field == "width"
    with pytest.raises(SettingsError, match="limit of 512") as e:
        SampleSettings(height=1024).resolve(view)
    assert e.value.field == "height"
    assert SampleSettings().resolve(view).latent_size(view) == (16, 16)
    assert SampleSettings(width=96, height=32).resolve(view).latent_size(view) == (8, 24)


def test_large_outputs_decode_in_tiles_one_image_at_a_time(pipe, monkeypatch):
    """Latents over 4x the trained area decode image by image in tiles of twice the trained
    side (bounded VAE memory); smaller ones, the trained size included, decode whole."""
    seen = []
    decode = pipe.model.vae.decode

    def spy(z, **kw):
        seen.append((tuple(z.shape), kw))
        return decode(z, **kw)

    monkeypatch.setattr(pipe.model.vae, "decode", spy)
    pipe("a red circle", num=2, steps=1, output_type="pt")
    pipe("a red circle", num=2, width=128, height=128, steps=1, output_type="pt")  # 4x: whole
    out = pipe("a red circle", num=2, width=144, height=128, steps=1, output_type="pt")
    assert out.shape == (2, 3, 128, 144)
    assert [kw for _, kw in seen] == [
        {"tile_size": None, "slice_batch": False},
        {"tile_size": None, "slice_batch": False},
        {"tile_size": 32, "slice_batch": True},
    ]


def test_vae_tiling_switch_forces_or_forbids_tiles_and_is_recorded(pipe, monkeypatch):
    """vae_tiling "on" tiles at the trained size, "off" decodes 144x128 whole; both close to
    each other at the trained size (one tile covers it) and recorded in the PNG parameters."""
    seen = []
    decode = pipe.model.vae.decode

    def spy(z, **kw):
        seen.append(kw)
        return decode(z, **kw)

    monkeypatch.setattr(pipe.model.vae, "decode", spy)
    on = pipe("a red circle", steps=1, vae_tiling="on", output_type="pt")
    off = pipe("a red circle", steps=1, vae_tiling="off", output_type="pt")
    pipe("a red circle", width=144, height=128, steps=1, vae_tiling="off", output_type="pt")
    assert seen == [
        {"tile_size": 32, "slice_batch": True},
        {"tile_size": None, "slice_batch": False},
        {"tile_size": None, "slice_batch": False},
    ]
    assert torch.allclose(on, off, atol=1e-5)
    view = ModelFolder.read(default_model_dir())
    s = SampleSettings(vae_tiling="on").resolve(view)
    assert SampleSettings.from_png_meta(s.to_png_meta()).vae_tiling == "on"
    with pytest.raises(SettingsError) as e:
        SampleSettings(vae_tiling="sometimes").resolve(view)
    assert e.value.field == "vae_tiling"
