"""KL autoencoder: shapes, exact SD size, posterior maths, overfitting, tiling, live preview."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from latentforge.errors import UserError
from latentforge.models.vae import (
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    _tiled,
    fit_latent_rgb_map,
    latent_to_rgb_preview,
    vae_preset,
)


def _model(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(config).eval()


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth two-colour gradients with a coloured disc on top, in [-1, 1]: (n, 3, size, size)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        c0, c1, disc_colour = (torch.rand(3, 3, 1, 1, generator=g) * 2 - 1).unbind(0)
        t = ((1 if i % 2 else -1) * xx + yy) / 4 + 0.5  # (size, size) in [0, 1]
        cy, cx = torch.rand(2, generator=g) - 0.5
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 0.15).float()
        img = c0 * (1 - t) + c1 * t  # (3, size, size)
        out.append(img * (1 - disc) + disc_colour * disc)
    return torch.stack(out)


@pytest.mark.parametrize(("name", "f"), [("f4-tiny", 4), ("f4c8-tiny", 4), ("f8-tiny", 8)])
def test_shapes(name: str, f: int) -> None:
    vae = _model(vae_preset(name))
    assert vae.downsample_factor == f
    x = _randn(2, 3, 64, 64).clamp(-1, 1)
    with torch.no_grad():
        posterior = vae.encode(x)
        z = posterior.sample(torch.Generator().manual_seed(0))
        assert z.shape == (2, vae.latent_channels, 64 // f, 64 // f)
        assert vae.decode(z).shape == (2, 3, 64, 64)
        recon, post = vae(x)
    assert recon.shape == x.shape
    assert post.kl().shape == (2,)


def test_tiny_presets_are_tiny() -> None:
    for name in ("f4-tiny", "f4c8-tiny", "f8-tiny"):
        with torch.device("meta"):
            vae = AutoencoderKL(vae_preset(name))
        assert sum(p.numel() for p in vae.parameters()) < 700_000


def test_sd_preset_matches_diffusers_autoencoder_kl() -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(vae_preset("sd"))
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    keys = set(vae.state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.resnets.1.conv2.weight",
        "encoder.down_blocks.2.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.mid_block.attentions.0.to_q.bias",
        "encoder.mid_block.attentions.0.to_out.0.weight",
        "encoder.mid_block.resnets.1.norm1.weight",
        "encoder.conv_norm_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.mid_block.attentions.0.to_v.weight",
        "decoder.up_blocks.3.resnets.2.conv1.weight",
        "decoder.up_blocks.2.upsamplers.0.conv.weight",
        "decoder.conv_out.bias",
    ):
        assert key in keys, key
    assert not any("up_blocks.3.upsamplers" in k or "down_blocks.3.down" in k for k in keys)
    assert vae.encoder.conv_out.out_channels == 8
    assert all(m.eps == 1e-6 for m in vae.modules() if isinstance(m, torch.nn.GroupNorm))


def test_config_round_trip_and_errors() -> None:
    cfg = vae_preset("f4-tiny", latent_channels=3)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    as_json = {**cfg.to_dict(), "block_out_channels": list(cfg.block_out_channels)}
    assert VAEConfig.from_dict(as_json) == cfg
    with pytest.raises(UserError, match="unknown VAE preset"):
        vae_preset("f16-huge")
    with pytest.raises(UserError, match="unknown VAE config keys"):
        VAEConfig.from_dict({"channels": 3})


def test_kl_matches_closed_form() -> None:
    mean, logvar = _randn(3, 4, 5, 6, seed=1), _randn(3, 4, 5, 6, seed=2)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(posterior.kl(), expected.sum(dim=(1, 2, 3)))
    x = _randn(3, 4, 5, 6, seed=3)
    nll = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.nll(x), nll)
    # logvar is clamped to [-30, 20] so exp() stays finite
    extreme = DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 100.0)], dim=1))
    assert extreme.logvar.max() == 20.0 and torch.isfinite(extreme.kl()).all()


def test_sample_is_seeded_and_mode_is_mean() -> None:
    posterior = DiagonalGaussian(_randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, posterior.sample(torch.Generator().manual_seed(8)))
    assert torch.equal(posterior.mode(), posterior.mean)
    # per-image generators: image i is the same whether drawn alone or in a batch
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batch = posterior.sample(gens)
    alone = DiagonalGaussian(posterior.moments[1:]).sample(torch.Generator().manual_seed(4))
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=0)


def test_tiny_vae_overfits_a_fixed_batch() -> None:
    x = _images()
    cfg = VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_groups=4)
    vae = _model(cfg).train()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        recon, posterior = vae(x, generator=gen)
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        recon, _ = vae(x, sample_posterior=False)
    mse = ((recon.clamp(-1, 1) - x) / 2).pow(2).mean()  # on [0, 1]
    psnr = -10 * torch.log10(mse)
    assert psnr > 25.0, f"PSNR {psnr:.2f} dB"  # 27.6 dB measured after 150 steps


def test_tile_blending_is_exact_for_a_pointwise_map() -> None:
    # A 1x1 conv + nearest upsample has no spatial context, so tiling must change nothing:
    # this checks the tile grid, the ramps and the weight normalisation on their own.
    conv = torch.nn.Conv2d(4, 3, 1)

    def up4(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(conv(t), scale_factor=4, mode="nearest")

    z = _randn(2, 4, 18, 13)
    with torch.no_grad():
        full = up4(z)
        for tile, overlap in [(8, 4), (8, 0), (6, 3), (5, 2)]:
            tiled = _tiled(up4, z, tile, overlap, up=4, down=1)
            torch.testing.assert_close(tiled, full, rtol=0, atol=1e-6)
        down = _tiled(lambda t: F.avg_pool2d(t, 4), full, 16, 8, up=1, down=4)
    torch.testing.assert_close(down, F.avg_pool2d(full, 4), rtol=0, atol=1e-6)


def test_tiled_decode_close_to_full_decode() -> None:
    vae = _model(vae_preset("f4-tiny"))
    z = _randn(1, 4, 16, 16, seed=1)
    with torch.no_grad():
        full = vae.decode(z)
        err = {
            (t, o): (vae.decode(z, tile_size=t, tile_overlap=o) - full).abs().mean().item()
            for t, o in [(8, 4), (8, 0), (12, 4)]
        }
    # Not exact: each tile sees zero padding where the full pass sees neighbours (the decoder's
    # receptive field is wider than 8 latent pixels), and GroupNorm / mid-block attention
    # statistics are per tile. Measured on this random model: mean |full| 0.27, MAE 0.13 for
    # tile 8 / overlap 4, 0.17 without overlap, 0.05 for tile 12.
    assert err[8, 4] < 0.2
    assert err[8, 4] < err[8, 0]  # blending the overlap beats hard seams
    assert err[12, 4] < err[8, 4]  # bigger tiles converge to the full decode


def test_tiled_encode_shape_and_bad_tiles() -> None:
    vae = _model(vae_preset("f4-tiny"))
    x = _randn(1, 3, 48, 48).clamp(-1, 1)
    with torch.no_grad():
        full = vae.encode(x).mean
        tiled = vae.encode(x, tile_size=32, tile_overlap=16).mean
        assert tiled.shape == full.shape == (1, 4, 12, 12)
        assert (tiled - full).abs().mean() < full.abs().mean()
        with pytest.raises(UserError, match="multiples"):
            vae.encode(x, tile_size=30)
        with pytest.raises(UserError, match="tile_overlap"):
            vae.decode(full, tile_size=8, tile_overlap=8)


def test_slice_batch_matches_batched() -> None:
    vae = _model(vae_preset("f4-tiny"))
    z = _randn(3, 4, 8, 8)
    x = _randn(3, 3, 32, 32).clamp(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            vae.decode(z, slice_batch=True), vae.decode(z), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            vae.encode(x, slice_batch=True).moments, vae.encode(x).moments, atol=1e-5, rtol=0
        )


def test_latent_rgb_map() -> None:
    vae = _model(vae_preset("f4-tiny"))
    images = _images(2, 64)
    rgb_map = fit_latent_rgb_map(vae, images)
    assert rgb_map.shape == (3, vae.latent_channels + 1)
    with torch.no_grad():
        z = vae.encode(images).mode()
    preview = latent_to_rgb_preview(z, rgb_map)
    assert preview.shape == (2, 3, 16, 16)
    assert preview.min() >= -1 and preview.max() <= 1


def test_latent_rgb_map_recovers_a_linear_encoder() -> None:
    # Known answer: if latents are an affine function of the pooled image, the fit inverts it.
    A, b = _randn(3, 3, seed=5), _randn(3, seed=6)

    class LinearEncoder:
        def encode(self, x: torch.Tensor) -> DiagonalGaussian:
            mean = torch.einsum("cd,bdhw->bchw", A, F.avg_pool2d(x, 4)) + b[:, None, None]
            return DiagonalGaussian(torch.cat([mean, torch.zeros_like(mean)], dim=1))

    images = _images(2, 32) * 0.9
    rgb_map = fit_latent_rgb_map(LinearEncoder(), images)  # type: ignore[arg-type]
    preview = latent_to_rgb_preview(LinearEncoder().encode(images).mode(), rgb_map)
    torch.testing.assert_close(preview, F.avg_pool2d(images, 4), atol=1e-4, rtol=0)
