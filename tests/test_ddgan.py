"""The denoising-diffusion GAN (training/ddgan.py, models/ddgan.py): the posterior it trains
with is the step `ddpm` samples with, each player gets the gradient of its own loss only, one
training step runs, a resumed run ends bit-exactly where an unbroken one does, and the result
is an ordinary T-step model folder."""

import pytest
import torch
from safetensors.torch import load_file

from latentforge import cli, sampling
from latentforge.io.model_folder import load_diffusion_model
from latentforge.models.ddgan import TimeDiscriminator
from latentforge.pipelines.common import make_sigmas
from latentforge.pipelines.generate import generate
from latentforge.training.ddgan import DDGANConfig, DDGANTrainer, posterior, train_ddgan


def _config(out, **kw) -> DDGANConfig:
    base = {"data": "digits", "out": str(out), "cond": "class", "max_steps": 4,
            "batch_size": 4, "sample_every": 0, "ckpt_every": 2, "quiet": True,
            "disc_channels": (16, 32)}  # fmt: skip
    return DDGANConfig(**{**base, **kw})


@pytest.mark.parametrize(("sigma", "sigma_prev"), [(83.2, 2.43), (1.01, 0.425), (0.425, 0.0)])
def test_posterior_is_the_ddpm_sampler_step(sigma, sigma_prev):
    g = torch.Generator().manual_seed(0)
    x0, x = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g) * sigma
    mean, std = posterior(x0, x, torch.tensor([sigma] * 2), torch.tensor([sigma_prev] * 2))
    down, up = sampling.ancestral_split(sigma, sigma_prev, 1.0)
    torch.testing.assert_close(mean, x0 + (down / sigma) * (x - x0))  # sampling's Euler step
    torch.testing.assert_close(std, torch.full_like(std, up))
    # and the sampler itself, with no noise to draw at the last step
    if sigma_prev == 0:
        out = sampling.sample_ddpm(lambda x, s, **c: x0, x, torch.tensor([sigma, 0.0]))
        torch.testing.assert_close(out, mean)


def test_discriminator_reads_pair_time_and_condition():
    torch.manual_seed(0)
    d = TimeDiscriminator(4, (16, 32), context_dim=8, num_classes=3, groups=4)
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, ctx = torch.tensor([0.0, 3.0]), torch.randn(2, 5, 8)
    out = d(a, b, t, context=ctx)
    assert out.shape == (2,)
    # the projection term: the same pair under another prompt scores differently
    assert not torch.allclose(out, d(a, b, t, context=ctx.flip(0)))
    assert not torch.allclose(d(a, b, t), d(a, b, t + 1))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cut = d(a, b, t, context=ctx[:, :2], context_mask=mask[:, :2])
    torch.testing.assert_close(
        d(a[:1], b[:1], t[:1], context=ctx[:1], context_mask=mask[:1]), cut[:1]
    )


def test_each_player_gets_only_its_own_gradient(tmp_path):
    trainer = DDGANTrainer(_config(tmp_path / "run"))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 10])
    loss_d, loss_g = trainer.gan_losses(x0, g, class_labels=labels)
    assert loss_d.shape == loss_g.shape == (4,) and torch.isfinite(loss_d + loss_g).all()
    gen = list(trainer.model.generator.parameters())
    disc = list(trainer.model.discriminator.parameters())
    d_from_g = torch.autograd.grad(loss_g.sum(), disc, allow_unused=True, retain_graph=True)
    g_from_d = torch.autograd.grad(loss_d.sum(), gen, allow_unused=True, retain_graph=True)
    assert all(x is None or x.abs().max() == 0 for x in [*d_from_g, *g_from_d])
    g_from_g = torch.autograd.grad(loss_g.sum(), gen, allow_unused=True, retain_graph=True)
    d_from_d = torch.autograd.grad(loss_d.sum(), disc, allow_unused=True)
    assert sum(x.abs().sum() for x in g_from_g if x is not None) > 0
    assert sum(x.abs().sum() for x in d_from_d if x is not None) > 0


def test_resume_is_bit_exact_and_the_folder_is_a_t_step_model(tmp_path):
    assert train_ddgan(_config(tmp_path / "a")) == 0
    assert train_ddgan(_config(tmp_path / "b", max_steps=2)) == 0
    assert train_ddgan(_config(tmp_path / "b"), resume=True) == 0
    a, b = (load_file(tmp_path / p / "model.safetensors") for p in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("discriminator" in k for k in a)  # the generator alone
    model = load_diffusion_model(tmp_path / "a")
    assert model.meta.sampling.sampler == "ddpm" and model.meta.sampling.steps == 4
    # the sampler's 4 trailing levels are the ones trained on
    trainer = DDGANTrainer(_config(tmp_path / "c"))
    sigmas = make_sigmas(model, 4).double()
    torch.testing.assert_close(sigmas.flip(0), trainer.levels().double(), rtol=1e-5, atol=0)
    calls = []
    images = generate(model, labels=[3], num=2, seed=0, callback=lambda *a: calls.append(1))
    assert images.shape == (2, 1, 16, 16) and len(calls) == 4
    torch.testing.assert_close(images, generate(model, labels=[3], num=2, seed=0))


def test_cli_trains_and_refuses_bad_settings(tmp_path):
    argv = ["train", "ddgan", "--data", "digits", "--out", str(tmp_path / "c"),
            "--max-steps", "1", "--batch-size", "2", "--sample-every", "0",
            "--disc-channels", "8,16", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    assert cli.main([*argv[:-7], "--disc-channels", "8,x"]) == 2
    assert cli.main([*argv[:6], "--num-steps", "9"]) == 2
