"""Latent consistency models: the U-Net's guidance embedding, the consistency parameterization,
the `lcm` sampler, and the import of a diffusers LCM folder, against diffusers' own
`LatentConsistencyModelPipeline` + `LCMScheduler` on a tiny random LCM U-Net (to 1e-4)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SD_SCHEDULER, TINY_UNET, TINY_VAE, char_tokenizer, perturbed, tiny_clip

from latentforge import sampling
from latentforge.errors import UserError
from latentforge.io.model_folder import (
    ConsistencyDenoiser,
    ModelMeta,
    load_diffusion_model,
    read_model_meta,
)
from latentforge.models.presets import unet_preset
from latentforge.models.unet import UNet
from latentforge.pipelines.common import conditioning, make_sigmas

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPT = "a red cat"
TOL = 1e-4


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A tiny diffusers LCM pipeline folder (random guidance projection) and its native import."""
    from latentforge.io.diffusers_format import import_model

    torch.manual_seed(0)
    scheduler = diffusers.LCMScheduler(
        **{k: v for k, v in SD_SCHEDULER.items() if k != "steps_offset"}
    )
    pipe = diffusers.LatentConsistencyModelPipeline(
        unet=perturbed(diffusers.UNet2DConditionModel(**TINY_UNET, time_cond_proj_dim=32), 1),
        vae=perturbed(diffusers.AutoencoderKL(**TINY_VAE), 2),
        text_encoder=tiny_clip(),
        tokenizer=char_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    root = tmp_path_factory.mktemp("lcm")
    pipe.save_pretrained(root / "diffusers")
    import_model(root / "diffusers", root / "native")
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "native"


def test_import_records_the_lcm(lcm_folder):
    _, native = lcm_folder
    meta = read_model_meta(native)
    assert meta.guidance_embedding == {"time_cond_proj_dim": 32, "guidance": 8.5}
    assert meta.parameterization["consistency"] == {"sigma_data": 0.5, "timestep_scaling": 10.0}
    assert (meta.defaults.sampler, meta.defaults.guidance) == ("lcm", 1.0)  # one pass a step
    model = load_diffusion_model(native)
    assert isinstance(model.denoiser, ConsistencyDenoiser)


@pytest.mark.parametrize(("steps", "guidance"), [(1, 8.5), (4, 8.5), (4, 3.0)])
def test_lcm_matches_diffusers(lcm_folder, steps, guidance):
    """The same noise, prompt and step noise (one generator, drawn in the same order): the
    final latents of diffusers' LCM pipeline and of the `lcm` sampler on the imported model."""
    pipe, native = lcm_folder
    model = load_diffusion_model(native)
    shape = (1, 4, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    want = pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
        height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(9),
    ).images  # fmt: skip

    timesteps = pipe.scheduler.timesteps.long()
    train = model.denoiser.train_sigmas64
    sigmas = torch.cat([train[timesteps], train.new_zeros(1)])
    # the imported model's default spacing (`lcm`) gives the scheduler's own levels
    assert model.meta.defaults.spacing == "lcm"
    torch.testing.assert_close(make_sigmas(model, steps).double(), sigmas, rtol=1e-6, atol=0)
    denoiser, cond = conditioning(model, 1, prompts=[PROMPT], guidance=guidance)
    assert denoiser is model.denoiser  # the scale is an input: no CFG pass
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)  # VP latents -> VE
    got = sampling.sample(
        "lcm", denoiser, x, sigmas, cond=cond, generator=torch.Generator().manual_seed(9)
    )
    diff = (got - want).abs().max().item()
    assert diff <= TOL, diff
    assert (got - noise).abs().max().item() > 0.1  # it did denoise


def _tiny_consistency(seed: int = 0) -> ConsistencyDenoiser:
    from latentforge.denoisers import make_denoiser

    torch.manual_seed(seed)
    unet = perturbed(UNet(unet_preset("tiny", in_channels=2, out_channels=2)), seed)
    spec = {"type": "vp", "prediction": "eps", "beta_schedule": "cosine"}
    return ConsistencyDenoiser(make_denoiser(unet, spec))


def test_boundary_condition_is_exact():
    """f(x, sigma_min) = x_t (the VP sample) exactly, whatever the network: c_skip(0) = 1 and
    c_out(0) = 0 (LCM's scalings); above sigma_min the network's x0 takes over."""
    den = _tiny_consistency()
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    sigma_min = den.train_sigmas64[0]
    got = den(x, sigma_min.expand(3))
    c_in = (1 + sigma_min**2).rsqrt().float()
    assert torch.equal(got, c_in * x)
    c_skip, c_out = den.scalings(sigma_min.reshape(1))
    assert (float(c_skip), float(c_out)) == (1.0, 0.0)
    high = den.train_sigmas64[500].expand(3)  # c_skip ~ 1e-8 there: the network's x0
    assert torch.allclose(den(x, high), den.inner(x, high), atol=1e-5)
    assert not torch.allclose(den(x, high), c_in * x, atol=0.1)


def test_one_step_is_one_call():
    """The 1-step lcm sampler returns the denoiser's output at sigma_max, with one call."""
    den = _tiny_consistency(1)
    calls = []
    den.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma_max = float(den.sigma_max)
    got = sampling.sample("lcm", den, x, torch.tensor([sigma_max, 0.0]))
    assert len(calls) == 1
    assert torch.equal(got, den(x, torch.full((2,), sigma_max)))


def test_multistep_renoises_with_the_generator():
    """Each step but the last adds sigma_next * fresh noise to the x0 estimate: two seeds give
    two samples; the same seed the same one."""
    den = _tiny_consistency(2)
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(4)) * 80
    sigmas = torch.cat([den.train_sigmas[[999, 499]], torch.zeros(1)])

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return sampling.sample("lcm", den, x, sigmas, generator=g)

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_zero_initialised_embedding_changes_nothing():
    """A U-Net given the guidance embedding computes what it did without it (distillation
    starts from the teacher), and the projection, once trained, makes the scale matter."""
    config = unet_preset("tiny", in_channels=4, out_channels=4, cross_attention_dim=16)
    torch.manual_seed(0)
    plain = perturbed(UNet(config))
    embedded = UNet(config, time_cond_proj_dim=32)
    state = {**plain.state_dict(), "time_embedding.cond_proj.weight": torch.zeros(64 // 2, 32)}
    embedded.load_state_dict(state)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 5, 16)
    want = plain(x, t, context=context)
    got = embedded.eval()(x, t, context=context, guidance=torch.tensor([2.0, 6.0]))
    assert torch.equal(got, want)
    perturbed(embedded.time_embedding.cond_proj)
    a = embedded(x, t, context=context, guidance=torch.tensor([2.0, 2.0]))
    b = embedded(x, t, context=context, guidance=torch.tensor([6.0, 6.0]))
    assert (a - b).abs().max() > 1e-3
    embedded.guidance = 6.0  # the folder's default scale stands in where a call gives none
    assert torch.equal(embedded(x, t, context=context), b)


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"time_cond_proj_dim": 33}, "even integer"),
        ({"time_cond_proj_dim": 32, "guidance": -1}, "guidance must be >= 0"),
        ({"time_cond_proj_dim": 32, "scale": 3}, "unknown keys"),
        ([], "must be an object"),
    ],
)
def test_guidance_embedding_is_validated(lcm_folder, section, match):
    _, native = lcm_folder
    d = json.loads((native / "model.json").read_text())
    d["guidance_embedding"] = section
    with pytest.raises(UserError, match=match):
        ModelMeta.from_json(d)


def test_consistency_needs_vp(lcm_folder):
    _, native = lcm_folder
    d = json.loads((native / "model.json").read_text())
    d["parameterization"] = {"type": "edm", "consistency": {"sigma_data": 0.5}}
    with pytest.raises(UserError, match="consistency needs a vp"):
        ModelMeta.from_json(d)
    d["parameterization"] = {"type": "vp", "consistency": {"sigma": 0.5}}
    with pytest.raises(UserError, match="unknown keys"):
        ModelMeta.from_json(d)


def test_export_refuses_embedded_guidance(lcm_folder, tmp_path):
    from latentforge.io.diffusers_format import export_model

    _, native = lcm_folder
    with pytest.raises(UserError, match="embeds its guidance scale"):
        export_model(native, tmp_path / "out")
    assert not (tmp_path / "out").exists()
