"""A1111 interchange (issue 24, item 6): sampler names, the `parameters` PNG chunk written
beside latentforge's own, read back, and a PNG written as A1111 writes it reproduced."""

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from latentforge import sampling
from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.io import a1111
from latentforge.io.images import read_png_metadata
from latentforge.io.model_folder import ModelFolder
from latentforge.pipelines.settings import SampleSettings, SettingsError
from latentforge.schedules import SPACINGS

# As A1111 v1.10 writes it (modules/processing.py create_infotext): a two-line prompt with a
# LoRA tag, a two-line negative, quoted values holding ", " and ": ", keys latentforge lacks.
A1111_INFOTEXT = (
    "a photo of a cat, (masterpiece:1.2) <lora:add_detail:0.5>\n"
    "on a sofa\n"
    "Negative prompt: blurry, lowres\n"
    "bad hands\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, "
    'Hires upscale: 2, Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "easynegative: c74b4e810b03, bad-hands: 9a2b1c0d3e4f", Version: v1.10.1'
)


@pytest.mark.parametrize(
    "name, scheduler, expected",
    [
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras", {})),  # A1111 < 1.9: folded in
        ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras", {})),  # >= 1.9: apart
        ("DPM++ 2M", "automatic", ("dpmpp_2m", None, {})),  # webuiapi's default
        ("Euler a", None, ("euler_ancestral", None, {})),
        ("Euler", "sgm_uniform", ("euler", "trailing", {})),  # /schedulers' name form
        ("DDIM", "DDIM", ("ddim", "leading", {})),
        ("UniPC", "Uniform", ("unipc", "linspace", {})),
        ("DPM++ 2M SDE Heun", None, ("dpmpp_2m_sde", None, {"solver_type": "heun"})),
        ("dpm++ 2m sde exponential", None, ("dpmpp_2m_sde", "exponential", {})),
        ("Heun", "Polyexponential", ("heun", "polyexponential", {})),
        ("ipndm", "optimized", ("ipndm", "optimized", {})),  # latentforge's own names too
    ],
)
def test_a1111_sampler_names(name, scheduler, expected):
    assert a1111.sampler_from_a1111(name, scheduler) == expected


@pytest.mark.parametrize("name", ["DPM fast", "DPM++ SDE", "Restart", "", "Euler a Karras x"])
def test_unknown_a1111_samplers_are_refused_by_name(name):
    with pytest.raises(UserError, match="unknown sampler"):
        a1111.sampler_from_a1111(name)
    with pytest.raises(UserError, match="unknown schedule type"):
        a1111.sampler_from_a1111("Euler", "Align Your Steps")


@pytest.mark.parametrize("sampler", sorted(sampling.SAMPLERS))
def test_every_sampler_and_spacing_round_trips_through_a1111_names(sampler):
    for spacing in (None, *SPACINGS):
        name, scheduler = a1111.sampler_to_a1111(sampler, spacing)
        assert a1111.sampler_from_a1111(name, scheduler) == (sampler, spacing, {})
        named = any(s == sampler for s, _ in a1111.SAMPLERS.values())
        if named and spacing in (None, "karras", "exponential"):  # what old names fold in
            assert a1111.sampler_from_a1111(name) == (sampler, spacing, {})
    heun = a1111.sampler_to_a1111("dpmpp_2m_sde", "karras", {"solver_type": "heun"})
    assert heun == ("DPM++ 2M SDE Heun Karras", "Karras")


def test_parse_a1111_infotext_as_a1111_does():
    p = a1111.parse_parameters(A1111_INFOTEXT)
    assert p["Prompt"] == "a photo of a cat, (masterpiece:1.2) <lora:add_detail:0.5>\non a sofa"
    assert p["Negative prompt"] == "blurry, lowres\nbad hands"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"  # unquoted, comma and colon kept
    assert p["TI hashes"] == "easynegative: c74b4e810b03, bad-hands: 9a2b1c0d3e4f"
    assert p["Size"] == "512x768" and p["Hires upscale"] == "2" and p["Version"] == "v1.10.1"
    # a text with fewer than 3 key: value pairs on its last line is all prompt (A1111's rule)
    assert a1111.parse_parameters("just a prompt: with a colon") == {
        "Prompt": "just a prompt: with a colon", "Negative prompt": ""
    }  # fmt: skip


def test_write_then_parse_back_is_exact():
    """Every value, quoting and multi-line text included, survives join -> parse."""
    fields = {"Steps": 3, "Sampler": "DPM++ 2M Karras", "Odd": 'a, "b": c', "Nl": "x\ny",
              "Seed": 5}  # fmt: skip
    text = a1111.join_parameters("line one\nline two", "neg, one\nneg two", fields)
    back = a1111.parse_parameters(text)
    assert back.pop("Prompt") == "line one\nline two"
    assert back.pop("Negative prompt") == "neg, one\nneg two"
    assert back == {k: str(v) for k, v in fields.items()}


def test_lora_tags_in_the_prompt():
    assert a1111.extract_loras("a cat <lora:x:0.5> on a mat <lora:y>") == (
        "a cat on a mat", ("x:0.5", "y:1"),
    )  # fmt: skip
    assert a1111.lora_tags(("loras/x.safetensors:0.5", "y")) == " <lora:x:0.5> <lora:y:1>"
    with pytest.raises(UserError, match="LoRA tag"):
        a1111.extract_loras("<lora:x:lots>")


def test_settings_from_an_a1111_png(tmp_path):
    """A PNG whose only metadata is the chunk A1111 writes (PIL's add_text, as A1111 saves
    it) gives back every parameter."""
    path = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_INFOTEXT)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    text = read_png_metadata(path)
    assert text["prompt"] == "a photo of a cat, (masterpiece:1.2)\non a sofa"
    assert SampleSettings.from_png_meta(text) == SampleSettings(
        sampler="dpmpp_2m", spacing="karras", steps=20, guidance=7.0, seed=1234567890,
        width=512, height=768, negative="blurry, lowres\nbad hands", layout="none",
        loras=("add_detail:0.5",),
        embeddings=("easynegative:c74b4e810b03", "bad-hands:9a2b1c0d3e4f"),
    )  # fmt: skip
    assert text["strength"] == "0.7"
    assert a1111.parse_parameters(text["parameters"])["Version"] == "v1.10.1"  # kept


def test_unreadable_a1111_chunk_is_one_user_error(tmp_path):
    path = tmp_path / "bad.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: many, Sampler: Euler, Seed: 1, CFG scale: 7")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    with pytest.raises(UserError, match="unreadable A1111 parameters"):
        read_png_metadata(path)


def test_resolve_accepts_a1111_names(tiny_digits_model):
    view = ModelFolder.read(tiny_digits_model)
    s = SampleSettings(sampler="DPM++ 2M Karras").resolve(view)
    assert (s.sampler, s.spacing) == ("dpmpp_2m", "karras")
    s = SampleSettings(sampler="Euler a", spacing="Exponential", knobs={"eta": 0.5}).resolve(view)
    assert (s.sampler, s.spacing, dict(s.knobs)) == ("euler_ancestral", "exponential", {"eta": 0.5})
    s = SampleSettings(sampler="DPM++ 2M SDE Heun Karras", spacing="trailing").resolve(view)
    assert (s.spacing, dict(s.knobs)) == ("trailing", {"solver_type": "heun"})  # ours wins
    for field, settings in (("sampler", SampleSettings(sampler="DPM fast")),
                            ("spacing", SampleSettings(spacing="Align Your Steps")),
                            ("loras", SampleSettings(loras=("x:1e999",))),
                            ("loras", SampleSettings(loras=("",)))):  # fmt: skip
        with pytest.raises(SettingsError) as e:
            settings.resolve(view)
        assert e.value.field == field


def test_generate_writes_both_chunks_and_each_reproduces(tiny_digits_model, tmp_path, capsys):
    """`generate` writes A1111's chunk beside its own; the same PNG with only the A1111 chunk
    left reproduces the image through --from-png, bit for bit."""
    m = str(tiny_digits_model)
    a = tmp_path / "a.png"
    argv = ["generate", "3", "--model", m, "--sampler", "DPM++ 2M Karras", "--steps", "3",
            "--seed", "7", "--guidance", "1.5", "--negative", "a, b: c",
            "--out", str(a)]  # fmt: skip
    assert main(argv) == 0
    with Image.open(a) as img:
        chunks = dict(img.text)
        pixels = np.asarray(img)
    p = a1111.parse_parameters(chunks["parameters"])
    assert p["Sampler"] == "DPM++ 2M Karras" and p["Seed"] == "7" and p["CFG scale"] == "1.5"
    assert p["Negative prompt"] == "a, b: c" and p["Prompt"] == "3" and p["Steps"] == "3"
    assert p["Model hash"] == chunks["model"][:10] and p["Model"] == tiny_digits_model.name
    assert p["Size"] == f"{img.width}x{img.height}"

    only = tmp_path / "only-a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", chunks["parameters"])
    Image.fromarray(pixels).save(only, pnginfo=info)
    b = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(only), "--model", m, "--out", str(b)]) == 0
    with Image.open(b) as img:
        assert np.array_equal(np.asarray(img), pixels)


def test_loras_are_recorded_in_both_formats():
    s = SampleSettings(seed=1, steps=2, sampler="euler", layout="none",
                       loras=("detail.safetensors:0.7", "ink"))  # fmt: skip
    meta = {"prompt": "a cat", **s.to_png_meta()}
    assert SampleSettings.from_png_meta(meta) == s  # unresolved fields stay unset
    text = a1111.format_parameters(meta)
    assert text.startswith("a cat <lora:detail:0.7> <lora:ink:1>\n")
    back = a1111.to_png_meta(a1111.parse_parameters(text))
    assert back["prompt"] == "a cat" and SampleSettings.from_png_meta(back).loras == (
        "detail:0.7", "ink:1",
    )  # fmt: skip


def test_from_png_without_parameters_is_one_line(tmp_path, capsys):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert main(["generate", "--from-png", str(path), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no latentforge generate parameters" in err[0]
