import dataclasses

import pytest
import torch

from latentforge.denoisers import make_denoiser
from latentforge.errors import UserError
from latentforge.models.presets import UNET_PRESETS, UNetConfig, unet_preset
from latentforge.models.unet import UNet, count_parameters


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("res", [16, 32])
def test_cpu_presets_keep_shape(name, res):
    torch.manual_seed(0)
    net = UNet(unet_preset(name, in_channels=1, out_channels=1, num_classes=10))
    x = torch.randn(2, 1, res, res)
    out = net(x, torch.tensor([3.0, 999.0]), class_labels=torch.tensor([1, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "params"), [("sd15", 859_520_964), ("sd21", 865_910_724)])
def test_sd_presets_have_the_exact_parameter_count(name, params):
    with torch.device("meta"):
        net = UNet(UNET_PRESETS[name])
        assert count_parameters(net) == params
        ctx_dim = UNET_PRESETS[name].cross_attention_dim
        out = net(torch.empty(2, 4, 64, 64), torch.ones(2), context=torch.empty(2, 77, ctx_dim))
    assert out.shape == (2, 4, 64, 64)


def test_conditioning_changes_the_output():
    torch.manual_seed(0)
    cfg = unet_preset("tiny", num_classes=3, cross_attention_dim=16)
    net = UNet(cfg)
    # zero-initialised layers would hide the conditioning; perturb all weights
    for p in net.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10.0])
    ctx = torch.randn(1, 5, 16)
    a = net(x, t, class_labels=torch.tensor([0]), context=ctx)
    b = net(x, t, class_labels=torch.tensor([1]), context=ctx)
    c = net(x, t, class_labels=torch.tensor([0]), context=torch.randn(1, 5, 16))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # masked-out context tokens have no effect
    mask = torch.tensor([[True, True, True, False, False]])
    ctx2 = ctx.clone()
    ctx2[:, 3:] = 100.0
    d1 = net(x, t, class_labels=torch.tensor([0]), context=ctx, context_mask=mask)
    d2 = net(x, t, class_labels=torch.tensor([0]), context=ctx2, context_mask=mask)
    assert torch.allclose(d1, d2, atol=1e-5)


def test_batch_independence():
    torch.manual_seed(0)
    net = UNet(unet_preset("tiny")).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1.0, 50.0, 900.0])
    full = net(x, t)
    assert torch.allclose(full[1:2], net(x[1:2], t[1:2]), atol=1e-5)


def test_tiny_unet_overfits_one_batch():
    """Fixed images, timesteps and noise: the eps-prediction loss falls by more than 10x."""
    torch.manual_seed(0)
    net = UNet(unet_preset("tiny", in_channels=1, out_channels=1))
    den = make_denoiser(net, {"type": "vp", "prediction": "eps", "beta_schedule": "cosine"})
    x0 = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = den.loss(x0, torch.Generator().manual_seed(2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_config_round_trip_and_errors():
    cfg = unet_preset("sd21")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown U-Net preset"):
        unet_preset("huge")
    with pytest.raises(UserError, match="unknown U-Net config"):
        UNetConfig.from_dict({"channels": 3})


def test_position_embedding_is_learned_and_resizes():
    """position_embedding=N: a learned N x N map added after conv_in. It starts at zero (the
    same function as without it), is trained, and is resized for other input sizes."""
    torch.manual_seed(0)
    cfg = unet_preset("tiny", in_channels=4, out_channels=4)
    plain, pos = UNet(cfg), UNet(UNetConfig.from_dict({**cfg.to_dict(), "position_embedding": 8}))
    missing = pos.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["position_embedding"]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    torch.testing.assert_close(pos(x, t), plain(x, t))

    pos(x, t).square().mean().backward()
    assert pos.position_embedding.grad.abs().sum() > 0
    with torch.no_grad():
        pos.position_embedding.normal_()
        # a shift of the input no longer shifts the output the same way: position is known
        assert not torch.allclose(pos(x, t), plain(x, t))
        for res in (8, 12, 16):
            assert pos(torch.randn(1, 4, res, res), t[:1]).shape == (1, 4, res, res)


def _refined_pair() -> tuple[UNet, UNet]:
    """A U-Net with a context refiner and its twin without one, sharing every other weight."""
    torch.manual_seed(0)
    cfg = unet_preset("shapes-t2i-bind", in_channels=4, out_channels=4, cross_attention_dim=16)
    plain = UNet(dataclasses.replace(cfg, context_refiner=0))
    for p in plain.parameters():  # zero-initialised layers would hide the context
        p.data.add_(torch.randn_like(p) * 0.05)
    refined = UNet(cfg)
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("context_refiner.") for k in missing)
    return plain.eval(), refined.eval()


def _live_refiner() -> UNet:
    """A U-Net whose refiner changes the tokens (its output projection no longer zero)."""
    _, net = _refined_pair()
    torch.nn.init.normal_(net.context_refiner.proj_out.weight, std=0.1)
    return net


def _context(batch: int = 3, tokens: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(batch, tokens, 16, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    return ctx, mask


def test_a_new_context_refiner_is_the_identity():
    """Zero-initialised output: a model fine-tuned with a new refiner starts as its source."""
    plain, refined = _refined_pair()
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([5.0, 300.0, 900.0])
    ctx, mask = _context()
    with torch.no_grad():
        assert torch.equal(refined.refine_context(ctx, mask), ctx)
        want = plain(x, t, context=ctx, context_mask=mask)
        assert torch.equal(refined(x, t, context=ctx, context_mask=mask), want)


def test_the_context_refiner_mixes_a_prompts_tokens_and_nothing_else():
    net = _live_refiner()
    ctx, mask = _context()
    with torch.no_grad():
        out = net.context_refiner(ctx, mask)
        # each prompt alone gives the same tokens as in the batch (batch independence)
        for i in range(3):
            alone = net.context_refiner(ctx[i : i + 1], mask[i : i + 1])
            assert torch.allclose(alone, out[i : i + 1], atol=1e-6)
        # padding does not leak into real tokens
        noisy = ctx.clone()
        noisy[2, 2:] += 5.0
        again = net.context_refiner(noisy, mask)
        assert torch.allclose(again[2, :2], out[2, :2], atol=1e-6)
        # but a word changes the other words of its prompt (what binds "red" to "circle")
        edited = ctx.clone()
        edited[0, 3] += 1.0
        moved = (net.context_refiner(edited, mask) - out)[0].abs().amax(-1)
        assert (moved[[0, 1, 2, 4, 5, 6]] > 1e-4).all()


def test_refined_context_is_reused_at_inference_and_never_stale():
    net = _live_refiner()
    ctx, mask = _context()
    with torch.no_grad():
        first = net.refine_context(ctx, mask)
        assert net.refine_context(ctx.clone(), mask.clone()) is first  # same values: reused
        other_mask = mask.clone()
        other_mask[0, -1] = False
        assert net.refine_context(ctx, other_mask) is not first
        net.context_refiner.proj_out.weight.mul_(2)  # an in-place update (EMA, load_state)
        assert not torch.allclose(net.refine_context(ctx, mask), first)
    with torch.enable_grad():  # training: never served from the memo
        assert net.refine_context(ctx, mask).grad_fn is not None


def test_refiner_and_position_map_are_not_exported_to_diffusers():
    from latentforge.io.diffusers_config import unet_config_to_diffusers

    for extra in ({"context_refiner": 2}, {"position_embedding": 16}):
        cfg = unet_preset("tiny", cross_attention_dim=16, **extra)
        with pytest.raises(UserError, match="not exportable"):
            unet_config_to_diffusers(cfg, 16)


@pytest.mark.parametrize("masked", [False, True])
def test_sliced_attention_equals_one_pass(monkeypatch, masked):
    """Forced query slicing (the MPS path): several SDPA calls, the one-pass result within
    float rounding, with and without a key mask."""
    from latentforge.models import layers

    attn = layers.Attention(32, 4, context_dim=24).eval()
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 50, 32, generator=gen), torch.randn(2, 7, 24, generator=gen)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if masked else None
    with torch.no_grad():
        whole = attn(x, ctx, mask)
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(q, *args, **kw):
            calls.append(q.shape[2])
            return sdpa(q, *args, **kw)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        monkeypatch.setenv("LATENTFORGE_ATTENTION", "sliced")
        monkeypatch.setattr(layers, "SLICE_SCORE_BYTES", 2 * 4 * 7 * 4 * 16)  # 16 queries
        sliced = attn(x, ctx, mask)
    assert calls == [16, 16, 16, 2]
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)
    monkeypatch.setenv("LATENTFORGE_ATTENTION", "full")
    calls.clear()
    with torch.no_grad():
        attn(x, ctx, mask)
    assert calls == [50]
