"""SDXL's U-Net: the added text-time embedding and per-level transformer depths, against
diffusers' UNet2DConditionModel on the same tiny random weights, and the real configs."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import perturbed  # noqa: E402

from latentforge.errors import UserError  # noqa: E402
from latentforge.io.diffusers_config import (  # noqa: E402
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from latentforge.io.diffusers_format import load_unet_module  # noqa: E402
from latentforge.models.presets import unet_preset  # noqa: E402
from latentforge.models.unet import UNet, count_parameters  # noqa: E402

# diffusers' own tiny SDXL test U-Net (tests/pipelines/stable_diffusion_xl): 80 = 32 + 6 x 8
TINY_SDXL_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 64,
    "norm_num_groups": 1,
}

SDXL_UNET_JSON = {  # stable-diffusion-xl-base-1.0 unet/config.json (the fields that matter)
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
SDXL_REFINER_JSON = {  # stable-diffusion-xl-refiner-1.0
    **SDXL_UNET_JSON,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
}  # fmt: skip


@pytest.fixture(scope="module")
def ref_and_ours(tmp_path_factory):
    torch.manual_seed(0)
    ref = perturbed(diffusers.UNet2DConditionModel(**TINY_SDXL_UNET))
    folder = tmp_path_factory.mktemp("sdxl-unet") / "unet"
    ref.save_pretrained(folder)
    return ref, load_unet_module(folder)


def _inputs(n_ids: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, 64, generator=g)
    pooled = torch.randn(2, 80 - 8 * n_ids, generator=g)
    ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 640, 384]])
    return x, torch.tensor([10.0, 500.0]), context, pooled, ids[:, :n_ids]


def test_tiny_sdxl_unet_matches_diffusers(ref_and_ours):
    ref, unet = ref_and_ours
    assert unet.config.transformer_depth == (1, 2)
    assert unet.config.addition_time_embed_dim == 8
    x, t, ctx, pooled, ids = _inputs()
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = unet(x, t, context=ctx, text_embeds=pooled, time_ids=ids)
        # the added embedding matters: other ids give another output
        other = unet(x, t, context=ctx, text_embeds=pooled, time_ids=ids.flip(0))
    assert (got - want).abs().max() < 1e-5
    assert (other - want).abs().max() > 1e-3


def test_added_inputs_are_checked(ref_and_ours):
    _, unet = ref_and_ours
    x, t, ctx, pooled, ids = _inputs()
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        unet(x, t, context=ctx)
    with pytest.raises(ValueError, match="give 72 added features; this U-Net takes 80"):
        unet(x, t, context=ctx, text_embeds=pooled, time_ids=ids[:, :5])


@pytest.mark.parametrize(
    ("name", "cfg", "params"),
    [("sdxl", SDXL_UNET_JSON, 2_567_463_684), ("sdxl-refiner", SDXL_REFINER_JSON, 2_259_526_660)],
)
def test_sdxl_configs_map_to_presets(name, cfg, params):
    """The real configs give the presets; the parameter count (meta device) is SDXL's, and
    diffusers' own U-Net from our exported config has the same count."""
    config = unet_config_from_diffusers(cfg)
    assert config == unet_preset(name)
    back = unet_config_to_diffusers(config, cfg["sample_size"])
    assert unet_config_from_diffusers(back) == config
    with torch.device("meta"):
        assert count_parameters(UNet(config)) == params
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in back.items() if k[0] != "_"})
    assert sum(p.numel() for p in ref.parameters()) == params


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"addition_time_embed_dim": None}, "needs an integer addition_time_embed_dim"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text' is not supported"),
        ({"transformer_layers_per_block": [1, 2]}, "needs one integer per level"),
        ({"reverse_transformer_layers_per_block": [[1], [2], [10]]}, "only the down blocks"),
    ],
)
def test_unsupported_sdxl_variants_are_refused(change, match):
    with pytest.raises(UserError, match=match):
        unet_config_from_diffusers({**SDXL_UNET_JSON, **change})
