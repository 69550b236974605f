"""The ControlNet network against diffusers' ControlNetModel and the U-Net's residual inputs."""

import pytest
import torch
from conftest import TINY_UNET, perturbed

from latentforge.io.diffusers_config import unet_config_from_diffusers
from latentforge.models.controlnet import ControlNet, ControlNetConfig, add_residuals
from latentforge.models.unet import UNet

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    unet = perturbed(diffusers.UNet2DConditionModel(**TINY_UNET), 1)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    perturbed(cn, 2)  # zero convs too, so every residual is checked
    config = unet_config_from_diffusers(dict(unet.config))
    ours_unet = UNet(config).eval()
    ours_unet.load_state_dict(unet.state_dict())
    ours_cn = ControlNet(ControlNetConfig(unet=config, embedding_channels=(8, 16))).eval()
    ours_cn.load_state_dict(cn.state_dict())
    return unet, cn, ours_unet, ours_cn


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 250.0])
    ctx = torch.randn(2, 5, 32, generator=g)
    image = torch.rand(2, 3, 32, 32, generator=g)
    return x, t, ctx, image


@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_and_controlled_unet_match_diffusers(pair, guess_mode):
    unet, cn, ours_unet, ours_cn = pair
    x, t, ctx, image = _inputs()
    with torch.no_grad():
        down_ref, mid_ref = cn(
            x, t, encoder_hidden_states=ctx, controlnet_cond=image, conditioning_scale=0.7,
            guess_mode=guess_mode, return_dict=False,
        )  # fmt: skip
        down, mid = ours_cn(x, t, image, scale=0.7, guess_mode=guess_mode, context=ctx)
        assert len(down) == len(down_ref)
        for a, b in zip(down, down_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mid, mid_ref, atol=1e-5, rtol=1e-5)
        ref = unet(
            x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down_ref,
            mid_block_additional_residual=mid_ref,
        ).sample  # fmt: skip
        out = ours_unet(x, t, context=ctx, control=(down, mid))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - ours_unet(x, t, context=ctx)).abs().max() > 1e-3  # the control matters


def test_from_unet_starts_as_the_plain_model():
    torch.manual_seed(0)
    config = unet_config_from_diffusers(dict(TINY_UNET))
    unet = UNet(config).eval()
    cn = ControlNet.from_unet(unet, ControlNetConfig(unet=config, embedding_channels=(8, 16)))
    x, t, ctx, image = _inputs(1)
    with torch.no_grad():
        control = cn(x, t, image, context=ctx)
        assert all(r.abs().max() == 0 for r in control[0]) and control[1].abs().max() == 0
        torch.testing.assert_close(
            unet(x, t, context=ctx, control=control), unet(x, t, context=ctx)
        )
    # the copied encoder equals the U-Net's
    assert torch.equal(
        cn.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight
    )


def test_multi_controlnet_sums_and_shape_errors(pair):
    *_, ours_cn = pair
    x, t, ctx, image = _inputs(2)
    with torch.no_grad():
        a = ours_cn(x, t, image, scale=0.5, context=ctx)
        b = ours_cn(x, t, image, scale=0.25, context=ctx)
        c = ours_cn(x, t, image, scale=0.75, context=ctx)
        down, mid = add_residuals([a, b])
        for s, r in zip([*down, mid], [*c[0], c[1]], strict=True):
            torch.testing.assert_close(s, r, atol=1e-6, rtol=1e-5)
        assert add_residuals([]) is None
        with pytest.raises(ValueError, match="does not match"):
            ours_cn(x, t, image[..., :16, :16], context=ctx)


def test_sdxl_controlnet_reads_the_added_embedding():
    """A ControlNet copied from an SDXL U-Net carries its text-time embedding: residuals equal
    diffusers' with the same text_embeds and time_ids."""
    from test_sdxl_unet import TINY_SDXL_UNET

    torch.manual_seed(0)
    unet = perturbed(diffusers.UNet2DConditionModel(**TINY_SDXL_UNET), 1)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    perturbed(cn, 2)
    config = unet_config_from_diffusers(dict(unet.config))
    ours = ControlNet(ControlNetConfig(unet=config, embedding_channels=(8, 16))).eval()
    ours.load_state_dict(cn.state_dict())
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999.0, 250.0])
    ctx, image = torch.randn(2, 5, 64, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 4, 2, 64, 64]])
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": ids}
    with torch.no_grad():
        down_ref, mid_ref = cn(x, t, encoder_hidden_states=ctx, controlnet_cond=image,
                               added_cond_kwargs=added, return_dict=False)  # fmt: skip
        down, mid = ours(x, t, image, context=ctx, **added)
        _, other = ours(x, t, image, context=ctx, text_embeds=added["text_embeds"] * 0,
                        time_ids=ids)  # fmt: skip
    for a, b in zip([*down, mid], [*down_ref, mid_ref], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (other - mid).abs().max() > 1e-4  # the pooled text reaches the residuals
