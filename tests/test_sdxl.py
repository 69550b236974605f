"""SDXL end to end: a tiny random diffusers StableDiffusionXLPipeline (diffusers' own tiny SDXL
U-Net, two tiny CLIP text encoders, the second with its projection, a tiny VAE with SDXL's
scaling factor) saved, imported and run by latentforge against diffusers from the same initial
latents; exported back and reloaded by diffusers.

How the samplers line up with diffusers' schedulers (leading spacing, DDIM with
set_alpha_to_one=True) is explained in tests/test_sd_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conftest import SD_SCHEDULER, TINY_VAE, char_tokenizer, perturbed  # noqa: E402
from test_sdxl_unet import TINY_SDXL_UNET  # noqa: E402

from latentforge.errors import UserError  # noqa: E402
from latentforge.io.diffusers_format import export_model, import_model, load_vae  # noqa: E402
from latentforge.io.model_folder import ModelMeta, load_diffusion_model  # noqa: E402
from latentforge.pipelines.common import make_sigmas  # noqa: E402
from latentforge.pipelines.generate import generate  # noqa: E402
from latentforge.pipelines.refine import generate_refined, split_schedule  # noqa: E402
from latentforge.pipelines.settings import SampleSettings, SettingsError  # noqa: E402

PROMPT, NEGATIVE = "a red cat on a mat", "blurry, low quality"
STEPS, GUIDANCE, SIZE = 4, 5.0, 32  # 32 px: 16x16 latents of the f=2 VAE
TOL = 1e-4


def _clip(projection: bool, seed: int):
    """diffusers' tiny SDXL text encoder config (32 wide, 5 layers) on the char tokenizer, with
    one head: single files imply 64-wide heads (at most one below 64 channels)."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=520, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=1, max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",  # bigG's and CLIP ViT-L's
        bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=32,
    )  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def _sdxl_pipe(refiner: bool = False):
    torch.manual_seed(0)
    unet = dict(TINY_SDXL_UNET)
    if refiner:  # bigG's context alone (32), ids (size, crop, score): 32 + 5 x 8
        unet |= {"cross_attention_dim": 32, "projection_class_embeddings_input_dim": 72}
    tokenizer_2 = char_tokenizer()
    tokenizer_2.pad_token = "!"  # as OpenCLIP bigG's tokenizer pads
    parts = {
        "unet": perturbed(diffusers.UNet2DConditionModel(**unet), 1),
        "vae": perturbed(diffusers.AutoencoderKL(**TINY_VAE, scaling_factor=0.13025), 2),
        "text_encoder": None if refiner else _clip(False, 3),
        "tokenizer": None if refiner else char_tokenizer(),
        "text_encoder_2": _clip(True, 4),
        "tokenizer_2": tokenizer_2,
        "scheduler": diffusers.DDIMScheduler(**SD_SCHEDULER),
    }
    if refiner:
        return diffusers.StableDiffusionXLImg2ImgPipeline(  # the real refiner's flags
            **parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    return diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl") / "diffusers"
    _sdxl_pipe().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def native(sdxl_folder, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("sdxl-native") / "model"
    info = import_model(sdxl_folder, dst)
    assert info["text_encoder"] and info["format"] == "diffusers"
    return dst


@pytest.fixture(scope="module")
def pipe(sdxl_folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(native):
    return load_diffusion_model(native)


@pytest.fixture(scope="module")
def noise():
    return torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(123))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _diffusers(pipe, scheduler, negative, noise, **kw):
    pipe.scheduler = scheduler
    images = pipe(
        PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        latents=noise.clone(), height=SIZE, width=SIZE, output_type="pt", **kw,
    ).images  # fmt: skip
    return images * 2 - 1


# --------------------------------------------------------------------------- import


def test_import_records_sdxl(native, model):
    meta = json.loads((native / "model.json").read_text())
    assert meta["text_encoder"] == {
        "type": "sdxl", "path": "text_encoder", "tokenizer": "tokenizer",
        "path_2": "text_encoder_2", "tokenizer_2": "tokenizer_2",
        "force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False,
    }  # fmt: skip
    assert meta["latent"]["scaling_factor"] == 0.13025
    assert meta["unet"]["transformer_depth"] == [1, 2]
    assert meta["sampling"]["guidance"] == 5.0
    encoder = model.text_encoder
    assert (encoder.dim, encoder.pooled_dim) == (64, 32)


def test_text_encoders_match_diffusers(pipe, model):
    """Penultimate states of both encoders concatenated, bigG's projected pooled output, the
    zeroed empty negative (force_zeros_for_empty_prompt) and a real negative prompt."""
    enc = model.text_encoder
    for negative in (None, NEGATIVE):
        want, want_neg, want_pooled, want_neg_pooled = pipe.encode_prompt(
            PROMPT, negative_prompt=negative, do_classifier_free_guidance=True
        )
        context, _ = enc.encode_prompts([PROMPT])
        assert context.shape == want.shape == (1, 77, 64)
        assert _max_diff(context, want) < 1e-6
        assert _max_diff(enc.encode_pooled([PROMPT]), want_pooled) < 1e-6
        if negative is None:
            assert not want_neg.any() and not want_neg_pooled.any()
        else:
            assert _max_diff(enc.encode_prompts([negative])[0], want_neg) < 1e-6
            assert _max_diff(enc.encode_pooled([negative]), want_neg_pooled) < 1e-6


def test_long_prompts_take_windows(pipe, model):
    """A prompt past 75 tokens: two 77-token windows; the first is diffusers' (truncated)
    encoding, and the pooled embedding is the first window's."""
    long = "a cat sitting on a red mat " * 4  # 108 characters: 108 tokens
    context, mask = model.text_encoder.encode_prompts([long])
    want, _, want_pooled, _ = pipe.encode_prompt(long, do_classifier_free_guidance=False)
    assert context.shape == (1, 154, 64) and mask.all()
    assert _max_diff(context[:, :77], want) < 1e-6
    assert _max_diff(model.text_encoder.encode_pooled([long]), want_pooled) < 1e-6


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-negative", "negative"])
@pytest.mark.parametrize(
    ("sampler", "scheduler_cls", "overrides"),
    [
        ("ddim", diffusers.DDIMScheduler, {"set_alpha_to_one": True}),
        ("euler", diffusers.EulerDiscreteScheduler, {}),
    ],
    ids=["ddim", "euler"],
)
def test_text2img_matches_diffusers(
    pipe, model, noise, sampler, scheduler_cls, overrides, negative
):
    scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    want = _diffusers(pipe, scheduler, negative, noise)
    got = generate(
        model, prompts=[PROMPT], negative=negative, steps=STEPS, guidance=GUIDANCE,
        sampler=sampler, spacing="leading", noise=noise, width=SIZE, height=SIZE,
    )  # fmt: skip
    assert got.shape == want.shape == (1, 3, SIZE, SIZE)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)


def test_size_conditioning_matches_diffusers(pipe, model, noise):
    """original_size / crops_coords_top_left / target_size and the negative ones reach the
    U-Net as diffusers' add_time_ids do, and change the image."""
    sizes = {
        "original_size": (512, 384), "crops_coords_top_left": (16, 8),
        "target_size": (1024, 1024), "negative_original_size": (256, 256),
        "negative_target_size": (64, 96),
        # diffusers' default once negative sizes are given; ours is the positive crop
        "negative_crops_coords_top_left": (0, 0),
    }  # fmt: skip
    scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    want = _diffusers(pipe, scheduler, NEGATIVE, noise, **sizes)
    kw = {"prompts": [PROMPT], "negative": NEGATIVE, "steps": STEPS, "guidance": GUIDANCE,
          "sampler": "euler", "spacing": "leading", "noise": noise, "width": SIZE,
          "height": SIZE}  # fmt: skip
    got = generate(model, **kw, **sizes)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)
    assert _max_diff(got, generate(model, **kw)) > 100 * TOL


def test_size_settings_resolve_and_round_trip(model):
    s = SampleSettings(crops_coords_top_left=[0, 64]).resolve(model)
    size = (64, 64)  # the model's output size
    assert (s.original_size, s.target_size, s.crops_coords_top_left) == (size, size, (0, 64))
    assert s.negative_crops_coords_top_left == (0, 64) and s.aesthetic_score is None
    again = SampleSettings.from_png_meta(s.to_png_meta())
    assert again.resolve(model) == s
    with pytest.raises(SettingsError, match="original_size must be two integers"):
        SampleSettings(original_size=(0, 5)).resolve(model)
    with pytest.raises(SettingsError, match="refiner's conditioning"):
        SampleSettings(aesthetic_score=6.0).resolve(model)


def test_size_settings_refused_for_other_models(native_sd):
    with pytest.raises(SettingsError, match="does not take it") as e:
        SampleSettings(target_size=(64, 64)).resolve(native_sd)
    assert e.value.field == "target_size"


@pytest.fixture(scope="module")
def native_sd(native):
    """A ModelFolder view of a plain SD model: the SDXL folder's meta without its SDXL parts."""
    from latentforge.io.model_folder import ModelFolder

    view = ModelFolder.read(native)
    view.meta = view.meta.replace(text_encoder={"type": "clip"})
    return view


# --------------------------------------------------------------------------- export, VAE


def test_export_reloads_in_diffusers(pipe, native, noise, tmp_path):
    info = export_model(native, tmp_path / "out")
    assert info["notes"] == []
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    again = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    again.set_progress_bar_config(disable=True)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    want = _diffusers(pipe, scheduler, NEGATIVE, noise)
    got = _diffusers(again, scheduler, NEGATIVE, noise)
    assert _max_diff(got, want) < 1e-6
    assert again.config.force_zeros_for_empty_prompt is True


def test_fp16_fix_vae_folder_imports(tmp_path):
    """madebyollin's sdxl-vae-fp16-fix is an AutoencoderKL folder like any other (its config
    adds force_upcast false): it loads as a VAE with SDXL's scaling factor."""
    vae = diffusers.AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=False)
    vae.save_pretrained(tmp_path / "vae")
    config, state = load_vae(tmp_path / "vae")
    assert config.scaling_factor == 0.13025
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())


def test_sdxl_unet_without_its_text_encoder_is_refused(sdxl_folder, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sdxl_folder, src)
    shutil.rmtree(src / "text_encoder_2")
    with pytest.raises(UserError, match="needs text_encoder_2"):
        import_model(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [({"path_2": "../x"}, "path_2 must be a sub-folder"),
     ({"force_zeros_for_empty_prompt": "yes"}, "must be true or false")],
)  # fmt: skip
def test_model_json_sdxl_block_is_checked(native, change, match):
    meta = json.loads((native / "model.json").read_text())
    meta["text_encoder"] |= change
    with pytest.raises(UserError, match=match):
        ModelMeta.from_json(meta, "model.json")


# --------------------------------------------------------------------------- refiner


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl-refiner") / "diffusers"
    _sdxl_pipe(refiner=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def refiner(refiner_folder, tmp_path_factory):
    dst = tmp_path_factory.mktemp("sdxl-refiner-native") / "model"
    import_model(refiner_folder, dst)
    return load_diffusion_model(dst)


def test_refiner_import(refiner):
    assert refiner.meta.text_encoder == {
        "type": "sdxl", "path_2": "text_encoder_2", "tokenizer_2": "tokenizer_2",
        "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True,
    }  # fmt: skip
    assert refiner.text_encoder.dim == 32
    s = SampleSettings().resolve(refiner)
    assert (s.aesthetic_score, s.negative_aesthetic_score, s.target_size) == (6.0, 2.5, None)
    with pytest.raises(SettingsError, match="base model's conditioning"):
        SampleSettings(target_size=(64, 64)).resolve(refiner)


def test_base_to_refiner_matches_diffusers(pipe, refiner_folder, model, refiner, noise):
    """The base's denoising_end=0.6 latents (2 of 4 steps: t = 751, 501) continued by the
    refiner's denoising_start=0.6 img2img (t = 251, 1, aesthetic-score ids), Euler."""
    assert split_schedule(model, make_sigmas(model, STEPS, "leading"), 0.6) == 2
    kw = {"negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
          "output_type": "pt"}  # fmt: skip
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    latents = pipe(PROMPT, **{**kw, "output_type": "latent"}, latents=noise.clone(),
                   height=SIZE, width=SIZE, denoising_end=0.6).images  # fmt: skip
    second = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    second.scheduler = diffusers.EulerDiscreteScheduler.from_config(second.scheduler.config)
    second.set_progress_bar_config(disable=True)
    want = second(PROMPT, **kw, image=latents, denoising_start=0.6).images * 2 - 1
    got = generate_refined(
        model, refiner, prompts=[PROMPT], negative=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
        sampler="euler", spacing="leading", noise=noise, width=SIZE, height=SIZE,
        refiner_start=0.6,
    )  # fmt: skip
    assert got.shape == want.shape == (1, 3, SIZE, SIZE)
    assert _max_diff(got, want) <= TOL, _max_diff(got, want)
    with pytest.raises(UserError, match=r"must be in \(0, 1\)"):
        generate_refined(model, refiner, prompts=[PROMPT], refiner_start=1.0)


# --------------------------------------------------------------------------- single files


def test_single_file_import(sdxl_folder, native, tmp_path):
    """The tiny SDXL in single-file keys (`model.diffusion_model.*`, `first_stage_model.*`,
    `conditioner.embedders.0.transformer.*` CLIP-L, `conditioner.embedders.1.model.*` bigG in
    OpenCLIP layout with `text_projection`) imports to the diffusers import's weights, configs
    and text encodings (single files imply 32 norm groups: the tiny U-Net's 1 aside)."""
    import dataclasses

    from safetensors.torch import save_file

    from latentforge.io import ldm
    from latentforge.io.diffusers_format import load_unet

    unet_config, unet = load_unet(sdxl_folder)
    vae_config, vae = load_vae(sdxl_folder)
    clip, bigg = (
        cls.from_pretrained(sdxl_folder / sub).state_dict()
        for cls, sub in ((transformers.CLIPTextModel, "text_encoder"),
                         (transformers.CLIPTextModelWithProjection, "text_encoder_2"))
    )  # fmt: skip
    state = {**ldm.to_ldm(unet_config, unet, vae_config, vae), **ldm.sdxl_text_to_ldm(clip, bigg)}
    assert "conditioner.embedders.1.model.text_projection" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "sdxl.safetensors")
    info = import_model(
        tmp_path / "sdxl.safetensors", tmp_path / "dst", num_heads=(2, 4), image_size=64,
        tokenizer=sdxl_folder,
    )  # fmt: skip
    assert info["format"] == "single-file"
    a, b = load_diffusion_model(native), load_diffusion_model(tmp_path / "dst")
    # the file holds no depth for level 0 (no attention): inferred as the others' 2
    got = b.denoiser.model.config
    assert got.transformer_depth == 2
    assert dataclasses.replace(got, norm_groups=1, transformer_depth=(1, 2)) == unet_config
    assert b.meta.text_encoder == a.meta.text_encoder
    assert b.meta.latent.scaling_factor == 0.13025
    for x, y in ((a.denoiser.model, b.denoiser.model), (a.vae, b.vae)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    for prompts in ([PROMPT], [NEGATIVE, ""]):
        assert torch.equal(a.text_encoder.encode_prompts(prompts)[0],
                           b.text_encoder.encode_prompts(prompts)[0])  # fmt: skip
        assert torch.equal(a.text_encoder.encode_pooled(prompts),
                           b.text_encoder.encode_pooled(prompts))  # fmt: skip


def test_cli_size_options_reach_the_settings(native, tmp_path):
    """generate --original-size / --crops-coords-top-left / --target-size: recorded in the PNG
    and reproduced by --from-png; the same options on an SD model are one line, exit 2."""
    from latentforge import cli
    from latentforge.io.images import read_png_metadata

    out = tmp_path / "a.png"
    argv = ["generate", PROMPT, "--model", str(native), "--out", str(out), "--steps", "2",
            "--num", "1", "--original-size", "512", "384", "--crops-coords-top-left", "16", "8",
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    s = SampleSettings.from_png_meta(read_png_metadata(out))
    assert s.original_size == (512, 384) and s.crops_coords_top_left == (16, 8)
    again = tmp_path / "b.png"
    assert cli.main(["generate", "--from-png", str(out), "--out", str(again), "--quiet"]) == 0
    assert SampleSettings.from_png_meta(read_png_metadata(again)) == s


def test_cli_refiner_is_the_hand_off(native, refiner, tmp_path):
    """generate --refiner DIR --refiner-start F writes what generate_refined makes (seed 0),
    and records the refiner in the PNG."""
    from latentforge import cli
    from latentforge.io.images import load_image, read_png_metadata

    out = tmp_path / "r.png"
    argv = ["generate", PROMPT, "--model", str(native), "--refiner", str(refiner.path),
            "--refiner-start", "0.6", "--steps", "4", "--sampler", "euler", "--seed", "0",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    want = generate_refined(load_diffusion_model(native), refiner, prompts=[PROMPT], steps=4,
                            sampler="euler", seed=0, refiner_start=0.6)  # fmt: skip
    got = load_image(out)
    assert (got - want.clamp(-1, 1)).abs().max() <= 2 / 255 + 1e-6
    assert json.loads(read_png_metadata(out)["refiner"])["start"] == 0.6
    assert cli.main([*argv[:-3], "--preview", str(tmp_path / "p.gif"), "--out", str(out)]) == 2
