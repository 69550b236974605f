"""Stable Diffusion import/export: diffusers folders and LDM single files <-> native, exactly.

Every model is a tiny random config built in the tests (diffusers' own tiny SD test config; the
`sd_folder` and `native` fixtures live in conftest.py); nothing is downloaded. Equality is
checked on outputs, not only on weights.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conftest import SD_SCHEDULER, TINY_UNET, perturbed, tiny_clip  # noqa: E402

from latentforge.denoisers import make_denoiser  # noqa: E402
from latentforge.errors import UserError  # noqa: E402
from latentforge.io import ldm  # noqa: E402
from latentforge.io.checkpoint import load_state_strict  # noqa: E402
from latentforge.io.diffusers_config import (  # noqa: E402
    parameterization_from_scheduler,
    scheduler_from_parameterization,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from latentforge.io.diffusers_format import (  # noqa: E402
    export_model,
    import_model,
    load_unet,
    load_unet_module,
    load_vae,
)
from latentforge.io.model_folder import ModelMeta, read_model_meta, save_model_folder  # noqa: E402
from latentforge.io.model_folder import load_vae as load_native_vae  # noqa: E402
from latentforge.models.presets import UNetConfig, unet_preset  # noqa: E402
from latentforge.models.unet import UNet  # noqa: E402
from latentforge.models.vae import AutoencoderKL  # noqa: E402

SD2_UNET = {**TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True}


def _inputs(seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    return x, torch.tensor([10.0, 500.0]), ctx


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _native_unet(folder: Path) -> UNet:
    config, state = load_unet(folder)
    unet = UNet(config).eval()
    load_state_strict(unet, state, "U-Net")
    return unet


# --------------------------------------------------------------------------- SD-sized configs

SD15_UNET_JSON = {  # stable-diffusion-v1-5 unet/config.json (the fields that matter)
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21_UNET_JSON = {  # stable-diffusion-2-1 (768-v)
    **SD15_UNET_JSON,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
}


@pytest.mark.parametrize("name, cfg", [("sd15", SD15_UNET_JSON), ("sd21", SD21_UNET_JSON)])
def test_sd_configs_map_to_presets(name, cfg):
    """Real SD configs give our presets exactly; LDM shapes (meta device) infer them back."""
    config = unet_config_from_diffusers(cfg)
    assert config == unet_preset(name)
    with torch.device("meta"):
        state = UNet(config).state_dict()
    assert (
        sum(v.numel() for v in state.values()) == {"sd15": 859_520_964, "sd21": 865_910_724}[name]
    )
    shapes = {ldm.unet_key_to_ldm(k, config): tuple(v.shape) for k, v in state.items()}
    assert len(shapes) == len(state)  # the key map is one-to-one
    assert ldm.infer_unet_config(shapes) == config
    back = unet_config_to_diffusers(config, cfg["sample_size"])
    assert unet_config_from_diffusers(back) == config


def test_sd_vae_config_maps_to_preset():
    from latentforge.io.diffusers_config import vae_config_from_diffusers
    from latentforge.models.vae import vae_preset

    sd_vae = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "latent_channels": 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512}  # fmt: skip
    assert vae_config_from_diffusers(sd_vae) == vae_preset("sd")
    with pytest.raises(UserError, match="shift_factor"):
        vae_config_from_diffusers({**sd_vae, "shift_factor": 0.1159})


# --------------------------------------------------------------------------- U-Net and VAE


@pytest.mark.parametrize("kwargs", [TINY_UNET, SD2_UNET], ids=["sd1", "sd2"])
def test_unet_import_matches_diffusers(kwargs, tmp_path):
    torch.manual_seed(0)
    ref = perturbed(diffusers.UNet2DConditionModel(**kwargs))
    ref.save_pretrained(tmp_path / "unet")
    unet = _native_unet(tmp_path / "unet")
    assert unet.config.linear_projection == kwargs.get("use_linear_projection", False)
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert (
            _max_diff(unet(x, t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample) < 1e-5
        )


def test_vae_import_matches_diffusers(sd_folder):
    ref = diffusers.AutoencoderKL.from_pretrained(sd_folder / "vae").eval()
    config, state = load_vae(sd_folder)
    vae = AutoencoderKL(config).eval()
    load_state_strict(vae, state, "VAE")
    assert config.scaling_factor == ref.config.scaling_factor
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert _max_diff(vae.encode(x).moments, ref.encode(x).latent_dist.parameters) < 1e-5
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        assert _max_diff(vae.decode(z), ref.decode(z).sample) < 1e-5


def test_lazy_bf16_load(sd_folder):
    unet = load_unet_module(sd_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in unet.parameters())
    ref = _native_unet(sd_folder)
    x, t, ctx = _inputs()
    with torch.no_grad():
        out = unet(x.bfloat16(), t, context=ctx.bfloat16()).float()
        assert _max_diff(out, ref(x, t, context=ctx)) < 0.1


# --------------------------------------------------------------------------- whole pipelines


def test_import_diffusers_folder(native, sd_folder):
    meta = json.loads((native / "model.json").read_text())
    assert meta["kind"] == "diffusion" and meta["cond"] == "text"
    assert meta["parameterization"]["prediction"] == "eps"
    assert meta["parameterization"]["beta_schedule"] == "scaled_linear"
    assert meta["data"] == {"resolution": 32, "channels": 4, "num_classes": 0, "class_names": []}
    assert meta["latent"]["image_resolution"] == 64 and meta["latent"]["scaling_factor"] == 0.18215
    assert meta["text_encoder"] == {
        "type": "clip",
        "path": "text_encoder",
        "tokenizer": "tokenizer",
        "clip_skip": 1,
    }
    assert meta["sampling"]["spacing"] == "leading"
    # the imported folders round-trip through ModelMeta like every folder the project writes
    assert read_model_meta(native).to_json() == meta
    vae_meta = read_model_meta(native / "vae")
    assert vae_meta.kind == "vae" and vae_meta.to_json() == json.loads(
        (native / "vae" / "model.json").read_text()
    )
    for sub in (
        "vae/model.json",
        "vae/model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
    ):
        assert (native / sub).is_file(), sub
    with pytest.raises(UserError, match="not empty"):
        import_model(sd_folder, native)


def test_imported_model_runs_in_the_pipeline(native, sd_folder):
    from latentforge.io.model_folder import load_diffusion_model
    from latentforge.pipelines.generate import generate

    model = load_diffusion_model(native)
    ref_text = transformers.CLIPTextModel.from_pretrained(sd_folder / "text_encoder").eval()
    tok = transformers.CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    ids = tok(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden, _ = model.text_encoder.encode(["a red cat"])
    with torch.no_grad():
        assert _max_diff(hidden, ref_text(ids).last_hidden_state) < 1e-5
    images = generate(model, prompts=["a red cat"], num=1, steps=2, guidance=2.0)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


@pytest.mark.parametrize("text_kind", ["clip", "openclip"])
def test_single_file_import(text_kind, sd_folder, tmp_path):
    ref = diffusers.UNet2DConditionModel.from_pretrained(sd_folder / "unet").eval()
    ref_vae = diffusers.AutoencoderKL.from_pretrained(sd_folder / "vae").eval()
    openclip = text_kind == "openclip"
    text = tiny_clip("gelu", layers=3) if openclip else tiny_clip()
    unet_config, unet_state = load_unet(sd_folder)
    vae_config, vae_state = load_vae(sd_folder)
    text_state = ldm.canonical_clip_names(text.state_dict())
    text_state = {k: v for k, v in text_state.items() if "position_ids" not in k}
    state = ldm.to_ldm(
        unet_config, unet_state, vae_config, vae_state, text_state, openclip=openclip
    )
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM's 1x1 convs
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state["model_ema.decay"] = torch.tensor(0.9999)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "sd.safetensors")
    dst = tmp_path / "native"
    info = import_model(
        tmp_path / "sd.safetensors",
        dst,
        tokenizer=sd_folder / "tokenizer",
        prediction="eps",
        image_size=64,
    )
    assert info["format"] == "single-file"
    unet = _native_unet(dst)
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert (
            _max_diff(unet(x, t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample) < 1e-5
        )
        vae, _ = load_native_vae(dst / "vae")
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        assert _max_diff(vae.decode(z), ref_vae.decode(z).sample) < 1e-5
        imported = transformers.CLIPTextModel.from_pretrained(dst / "text_encoder").eval()
        ids = torch.tensor([[512, 40, 41, 513, 513]])
        want = text(ids, output_hidden_states=True)
        # SD 2.x: the penultimate layer, then the final layer norm
        final_norm = getattr(text, "text_model", text).final_layer_norm
        want = final_norm(want.hidden_states[-2]) if openclip else want.last_hidden_state
        assert _max_diff(imported(ids).last_hidden_state, want) < 1e-5
    meta = json.loads((dst / "model.json").read_text())
    assert meta["data"]["resolution"] == 32 and UNetConfig.from_dict(meta["unet"]) == unet_config


def test_single_file_schedule_is_checked(sd_folder, tmp_path):
    config, state = load_unet(sd_folder)
    full = ldm.to_ldm(config, state, *load_vae(sd_folder))
    full["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    from safetensors.torch import save_file

    save_file(full, tmp_path / "sd.safetensors")
    with pytest.raises(UserError, match="alphas_cumprod"):
        import_model(tmp_path / "sd.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- export


def test_export_round_trip(native, tmp_path):
    dst = tmp_path / "exported"
    info = export_model(native, dst, "diffusers")
    assert info["notes"] == []
    unet_json = json.loads((dst / "unet" / "config.json").read_text())
    assert unet_json["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in unet_json
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(dst, safety_checker=None)
    unet = _native_unet(native)
    x, t, ctx = _inputs()
    with torch.no_grad():
        got = pipe.unet.eval()(x, t, encoder_hidden_states=ctx).sample
        assert _max_diff(got, unet(x, t, context=ctx)) < 1e-5
    meta = json.loads((native / "model.json").read_text())
    den = make_denoiser(unet, meta["parameterization"])
    alpha_bar = 1 / (1 + den.train_sigmas64**2)
    assert torch.allclose(alpha_bar.float(), pipe.scheduler.alphas_cumprod, atol=1e-6)
    again = tmp_path / "again"
    import_model(dst, again)
    assert json.loads((again / "model.json").read_text())["unet"] == meta["unet"]


def test_export_class_embedding_and_single_file(tmp_path):
    config = UNetConfig(**{**unet_config_from_diffusers(TINY_UNET).to_dict(), "num_classes": 3})
    torch.manual_seed(0)
    unet = perturbed(UNet(config))
    meta = ModelMeta.from_json({
        "kind": "diffusion",
        "unet": config.to_dict(),
        "data": {"resolution": 16, "channels": 4},
        "parameterization": {"type": "vp", "prediction": "v", "beta_schedule": "linear"},
    })  # fmt: skip
    save_model_folder(tmp_path / "native", meta, unet.state_dict())
    info = export_model(tmp_path / "native", tmp_path / "out")
    assert "model_index.json" in info["notes"][0]
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
    assert ref.config.num_class_embeds == 4
    x, t, ctx = _inputs()
    labels = torch.tensor([0, 3])  # 3 = our null class, diffusers' last row
    with torch.no_grad():
        want = unet(x, t, context=ctx, class_labels=labels)
        assert (
            _max_diff(ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample, want) < 1e-5
        )
    sched = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["beta_schedule"] == "linear"
    # no VAE and a linear schedule: no SD single file holds it, and export says why
    with pytest.raises(UserError, match=r"no VAE.*linear schedule.*--format diffusers"):
        export_model(tmp_path / "native", tmp_path / "sd.safetensors", "single-file")
    from safetensors.torch import save_file

    save_file(ldm.to_ldm(config, unet.state_dict()), tmp_path / "sd.safetensors")
    parts = ldm.split_checkpoint(ldm.open_weights(tmp_path / "sd.safetensors"))
    back, state = ldm.unet_from_checkpoint(parts)
    assert back == config
    assert all(torch.equal(state[k].load(), v) for k, v in unet.state_dict().items())


def test_export_refuses_self_attention_only_unet():
    with pytest.raises(UserError, match="self-attention only"):
        unet_config_to_diffusers(unet_preset("tiny"), 32)


# --------------------------------------------------------------------------- bad input


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles(sd_folder, tmp_path):
    config, state = load_unet(sd_folder)
    full = ldm.to_ldm(config, state, *load_vae(sd_folder))
    torch.save({"state_dict": full, "global_step": 3}, tmp_path / "sd.ckpt")
    with pytest.raises(UserError, match="--allow-pickle") as e:
        import_model(tmp_path / "sd.ckpt", tmp_path / "a")
    assert "\n" not in str(e.value)
    import_model(tmp_path / "sd.ckpt", tmp_path / "b", allow_pickle=True)
    assert (tmp_path / "b" / "model.safetensors").is_file()
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil(marker)}}, f)
    with pytest.raises(UserError, match="weights_only=True") as e:
        import_model(tmp_path / "evil.ckpt", tmp_path / "c", allow_pickle=True)
    assert not marker.exists() and "\n" not in str(e.value)


def test_strict_errors_list_keys(sd_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text((sd_folder / "unet" / "config.json").read_text())
    weights = load_file(sd_folder / "unet" / "diffusion_pytorch_model.safetensors")
    weights.pop("conv_in.bias")
    weights["bogus.weight"] = torch.zeros(1)
    weights["conv_out.bias"] = torch.zeros(7)
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError) as e:
        load_unet(folder)
    msg = str(e.value)
    assert "missing: conv_in.bias" in msg and "unexpected: bogus.weight" in msg
    assert "shape: conv_out.bias (7,) != (4,)" in msg


def test_corrupt_and_unsupported_files(tmp_path, sd_folder):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserError, match="not a readable safetensors") as e:
        import_model(bad, tmp_path / "x")
    assert "\n" not in str(e.value)
    config, state = load_unet(sd_folder)
    from safetensors.torch import save_file

    save_file(ldm.to_ldm(config, state), tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors"):
        import_model(tmp_path / "cut.safetensors", tmp_path / "y")
    with pytest.raises(UserError, match="SDXL"):
        unet_config_from_diffusers({**TINY_UNET, "addition_embed_type": "text_time"})
    with pytest.raises(UserError, match="not found"):
        import_model(tmp_path / "missing", tmp_path / "z")


def test_cli_import_export(sd_folder, tmp_path, monkeypatch, capsys):
    from latentforge import cli as cli_module
    from latentforge.commands.sd import export, import_cmd

    monkeypatch.setitem(cli_module.cli.commands, "import", import_cmd)
    monkeypatch.setitem(cli_module.cli.commands, "export", export)
    config, state = load_unet(sd_folder)
    torch.save(ldm.to_ldm(config, state, *load_vae(sd_folder)), tmp_path / "sd.ckpt")
    assert cli_module.main(["import", str(tmp_path / "sd.ckpt"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-pickle" in err
    rc = cli_module.main(["import", str(sd_folder), str(tmp_path / "n"), "--dtype", "fp16"])
    assert rc == 0 and "U-Net" in capsys.readouterr().out
    rc = cli_module.main(
        ["export", str(tmp_path / "n"), "--format", "diffusers", str(tmp_path / "d")]
    )
    assert rc == 0 and (tmp_path / "d" / "model_index.json").is_file()


# --------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize(
    "kwargs",
    [
        {**SD_SCHEDULER, "prediction_type": "epsilon"},
        {**SD_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {**SD_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"},
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    ],
    ids=["eps", "v", "zero-snr", "cosine", "linear"],
)
def test_scheduler_mapping(kwargs):
    sched = diffusers.DDIMScheduler(**kwargs)
    spec = parameterization_from_scheduler(dict(sched.config))
    want = {"epsilon": "eps", "v_prediction": "v"}[sched.config.prediction_type]
    assert spec["prediction"] == want
    den = make_denoiser(torch.nn.Identity(), spec)
    alpha_bar = (1 / (1 + den.train_sigmas64**2)).float()
    ref = sched.alphas_cumprod
    n = -1 if spec["zero_terminal_snr"] else None  # the zero-SNR endpoint is clamped on purpose
    assert torch.allclose(alpha_bar[:n], ref[:n], rtol=1e-5, atol=1e-7)
    back = diffusers.DDIMScheduler.from_config(scheduler_from_parameterization(spec))
    assert torch.allclose(back.alphas_cumprod, ref, atol=1e-7)
    assert back.config.prediction_type == sched.config.prediction_type
