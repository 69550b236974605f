"""Editing pipelines: img2img (SDEdit), training-free inpainting (+ RePaint), interpolation.

Exact answers come from an analytic denoiser for Gaussian data; the tiny digits model (random
weights, real U-Net and VP parameterization) checks invariants that hold for any network.
"""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from latentforge import sampling
from latentforge.cli import main
from latentforge.io.images import save_png
from latentforge.io.model_folder import LoadedModel, load_diffusion_model
from latentforge.pipelines.common import make_sigmas
from latentforge.pipelines.generate import generate
from latentforge.pipelines.img2img import img2img
from latentforge.pipelines.inpaint import feather_mask, inpaint
from latentforge.pipelines.interpolate import decode_noise, interpolate, invert, slerp, walk

MU, SA, SB = 0.2, 1.0, 0.05  # x0 = a * ones + SB * n, a ~ N(MU, SA^2), n ~ N(0, I)


class CorrelatedGaussian(nn.Module):
    """Exact E[x0 | x0 + sigma eps = x] for the data above: a Gaussian with covariance
    SA^2 11^T + SB^2 I, whose eigen-split is the image mean (variance D SA^2 + SB^2) and the
    rest (SB^2). Every pixel is informative about every other one, so a known region must
    pull the regenerated one to its level. Counts its calls."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def prior_scale(self, sigma):
        return sigma

    def forward(self, x, sigma, **cond):
        self.calls += 1
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2  # (B, 1, 1, 1)
        lam = x[0].numel() * SA**2 + SB**2
        r = x - MU
        r_mean = r.mean((1, 2, 3), keepdim=True)
        return MU + lam / (lam + s2) * r_mean + SB**2 / (SB**2 + s2) * (r - r_mean)


def analytic_model(res: int = 8, steps: int = 10) -> LoadedModel:
    meta = {
        "kind": "diffusion",
        "parameterization": {"type": "edm"},  # the denoiser is injected: an exact Gaussian
        "unet": {"num_classes": 0, "in_channels": 1, "out_channels": 1},
        "data": {"channels": 1, "resolution": res},
        "sampling": {"sampler": "ddim", "steps": steps, "spacing": "karras", "guidance": 1.0},
    }
    return LoadedModel(meta, Path("."), denoiser=CorrelatedGaussian())


@pytest.fixture(scope="module")
def digits(tiny_digits_model):
    return load_diffusion_model(tiny_digits_model)


def _counter():
    steps = []
    return steps, lambda i, sigma, x, denoised: steps.append(float(sigma))


# ----- img2img ---------------------------------------------------------------------------------
def test_img2img_strength_0_returns_the_input_without_calling_the_model():
    model = analytic_model()
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    out = img2img(model, image, strength=0.0, seed=3)
    assert torch.equal(out, image) and model.denoiser.calls == 0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_img2img_strength_1_is_generate_bit_for_bit(digits, sampler):
    image = torch.rand(3, 1, 16, 16) * 2 - 1
    kw = {"seed": 5, "sampler": sampler, "steps": 3, "labels": [1, 7, None]}
    ours = img2img(digits, image, strength=1.0, **kw)
    assert torch.equal(ours, generate(digits, num=3, **kw))


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.25, 0.5, 0.8])
def test_img2img_runs_round_strength_times_steps_on_the_schedule_tail(sampler, strength):
    if sampler not in sampling.SAMPLERS:
        pytest.skip(f"sampler {sampler!r} is not registered yet in sampling.SAMPLERS")
    model, steps = analytic_model(), 10
    seen, callback = _counter()
    img2img(model, torch.zeros(1, 1, 8, 8), strength=strength, steps=steps, sampler=sampler,
            callback=callback)  # fmt: skip
    k = round(strength * steps)
    full = make_sigmas(model, steps)
    assert len(seen) == k
    assert seen == pytest.approx(full[steps - k : steps].tolist())


@pytest.mark.parametrize("sampler", sorted(sampling.SAMPLERS))
def test_every_registered_sampler_edits(sampler):
    """Whatever sampler is registered: strength 1 is generate bit for bit, strength 0.5 runs
    5 of 10 steps, inpainting keeps the known pixels exactly (RePaint segments included)."""
    model = analytic_model()
    image = torch.full((1, 1, 8, 8), 0.8)
    kw = {"seed": 4, "sampler": sampler, "steps": 10}
    assert torch.equal(img2img(model, image, strength=1.0, **kw), generate(model, **kw))
    seen, callback = _counter()
    img2img(model, image, strength=0.5, callback=callback, **kw)
    assert len(seen) == 5
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    out = inpaint(model, image, mask, resample=2, jump=3, **kw)
    assert torch.equal(out[..., :4], image[..., :4]) and torch.isfinite(out).all()


def test_img2img_low_strength_stays_close_and_is_seeded_per_image():
    model = analytic_model()
    image = torch.full((1, 1, 8, 8), 0.5)
    one = img2img(model, image, strength=0.3, seed=7, num=3)
    # the image level survives; only pixel detail at the scale of SB is redrawn
    assert (one.mean((1, 2, 3)) - 0.5).abs().max() < 0.05
    assert (one - image).abs().max() < 4 * SB
    assert torch.equal(one[1:2], img2img(model, image, strength=0.3, seed=8))


# ----- inpaint ---------------------------------------------------------------------------------
@pytest.mark.parametrize("feather", [0, 3])
def test_inpaint_keeps_unmasked_pixels_exactly(digits, feather):
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 3:10] = 1
    out = inpaint(digits, image, mask, steps=3, seed=1, labels=[3], feather=feather, num=2)
    keep = mask.expand_as(out) == 0
    assert (out - image)[keep].abs().max() == 0
    assert (out - image)[~keep].abs().max() > 0.05


def test_inpaint_mask_of_zeros_returns_the_input_and_of_ones_is_generate(digits):
    """Nothing to regenerate: the input comes back unchanged. Everything to regenerate: the
    image is generate's for the same seed, bit for bit (the known region never enters)."""
    image = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(steps=3, seed=4, labels=[3], num=2)
    assert torch.equal(inpaint(digits, image, torch.zeros(1, 1, 16, 16), **kw), image)
    whole = inpaint(digits, image, torch.ones(1, 1, 16, 16), **kw)
    assert torch.equal(whole, generate(digits, **kw))


def test_inpaint_mask_of_another_size_is_a_clear_error(digits):
    from latentforge.errors import UserError

    image = torch.zeros(1, 1, 16, 16)
    with pytest.raises(UserError, match="mask"):
        inpaint(digits, image, torch.ones(1, 1, 8, 8), steps=2, labels=[3])


def test_feather_ramps_inside_the_mask_only():
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 2:10, 2:10] = 1
    w = feather_mask(mask, 2)
    assert torch.equal(w[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert w[0, 0, 2, 5] == pytest.approx(1 / 3) and w[0, 0, 3, 5] == pytest.approx(2 / 3)
    assert w[0, 0, 5, 5] == 1


def test_inpaint_the_known_region_drives_the_result():
    """Left half known at 0.8. The exact conditional mean of the regenerated right half is
    ~0.8, while a free draw has its mean anywhere in MU +- SA. Plain replacement gets within
    0.35 (it is biased: the known half only pulls the other half once sigma is small); RePaint
    resampling (5x) fixes that to within 0.05 (measured: 0.02-0.03)."""
    image = torch.full((1, 1, 8, 8), 0.8)
    image[..., 4:] = -1.0  # what the mask discards
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    plain, repainted, free = [], [], []
    for seed in range(4):
        out = inpaint(analytic_model(), image, mask, steps=20, seed=seed)
        assert torch.equal(out[..., :4], image[..., :4])
        plain.append(out[..., 4:].mean() - 0.8)
        out = inpaint(analytic_model(), image, mask, steps=20, seed=seed, resample=5)
        repainted.append(out[..., 4:].mean() - 0.8)
        free.append(
            img2img(analytic_model(), image, strength=1.0, steps=20, seed=seed).mean() - 0.8
        )
    plain, repainted, free = (torch.stack(v).abs() for v in (plain, repainted, free))
    assert plain.max() < 0.35 and repainted.max() < 0.05
    assert free.max() > 1.0  # without the known region, seeds land far from 0.8


@pytest.mark.parametrize(("resample", "jump"), [(1, 1), (3, 1), (3, 2), (2, 4)])
def test_repaint_runs_each_step_resample_times(resample, jump):
    model, steps = analytic_model(), 6
    seen, callback = _counter()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    out = inpaint(model, torch.zeros(1, 1, 8, 8), mask, steps=steps, sampler="ddim",
                  resample=resample, jump=jump, callback=callback)  # fmt: skip
    assert model.denoiser.calls == steps * resample == len(seen)
    assert torch.isfinite(out).all()
    full = make_sigmas(model, steps)[:-1].tolist()
    assert seen[:jump] * resample == pytest.approx(seen[: jump * resample])
    assert sorted(set(seen), reverse=True) == pytest.approx(full)


# ----- interpolation ---------------------------------------------------------------------------
def test_slerp_endpoints_and_norm():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for t in (0.1, 0.5, 0.77):
        assert slerp(a, b, t).norm() == pytest.approx(1.0, abs=1e-6)
    x, y = torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5)
    assert torch.equal(slerp(x, y, 0.0), x) and torch.equal(slerp(x, y, 1.0), y)
    assert torch.allclose(slerp(x, x, 0.3), x)  # parallel: falls back to lerp


def test_ddim_inversion_reconstructs_with_an_exact_denoiser():
    """DDIM inversion + DDIM decoding is exact up to the first-order error of the two Euler
    passes: max abs error < 0.07 at 40 karras steps, < 0.035 at 80 (measured 0.064, 0.033),
    halving as the steps double. The inverted noise has the prior's scale (std ~ sigma_max)."""
    gen = torch.Generator().manual_seed(0)
    image = MU + 0.3 * torch.randn(2, 1, 1, 1, generator=gen)
    image = image + SB * torch.randn(2, 1, 8, 8, generator=gen)  # a draw, inside [-1, 1]
    errors = []
    for steps in (40, 80):
        model = analytic_model(steps=steps)
        x_T = invert(model, image)
        assert x_T.std() == pytest.approx(80.0, rel=0.2)
        errors.append(float((decode_noise(model, x_T) - image).abs().max()))
    assert errors[0] < 0.07 and errors[1] < 0.035
    assert errors[0] / errors[1] == pytest.approx(2.0, rel=0.15)


def test_interpolate_and_walk_frames(digits):
    a, b = torch.rand(1, 1, 16, 16) * 2 - 1, torch.rand(1, 1, 16, 16) * 2 - 1
    frames = interpolate(digits, a, b, frames=4, labels_a=1, labels_b=7, steps=2)
    assert frames.shape == (4, 1, 16, 16) and frames.abs().max() <= 1
    w = walk(digits, 3, 4, frames=3, labels_a=2, labels_b=2, steps=2, guidance=1.0)
    assert w.shape == (3, 1, 16, 16)
    first = generate(digits, seed=3, labels=[2], steps=2, sampler="ddim", guidance=1.0)
    assert torch.allclose(w[:1], first, atol=1e-5)
    mixed = walk(digits, 3, 4, frames=3, labels_a=2, labels_b=5, steps=2, guidance=2.0)
    assert mixed.shape == (3, 1, 16, 16)
    last = generate(digits, seed=4, labels=[5], steps=2, sampler="ddim", guidance=2.0)
    assert torch.allclose(mixed[2:], last, atol=1e-5)
    # a guidance interval reaches the walk: its end frame is generate's with the same interval
    kw = dict(steps=4, guidance=4.0, guidance_interval=(1.0, 20.0))
    limited = walk(digits, 3, 4, frames=2, labels_a=2, labels_b=5, **kw)
    want = generate(digits, seed=4, labels=[5], sampler="ddim", **kw)
    assert torch.allclose(limited[1:], want, atol=1e-5)
    every = generate(digits, seed=4, labels=[5], sampler="ddim", steps=4, guidance=4.0)
    assert not torch.allclose(want, every, atol=1e-3)  # the interval changed something
    again = interpolate(digits, a, b, frames=2, labels_a=1, labels_b=7, **kw)
    assert again.shape == (2, 1, 16, 16)


# ----- CLI -------------------------------------------------------------------------------------
def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("latentforge: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def files(tmp_path):
    """A 20x20 RGB picture (resized and greyed by the commands), a 9x9 mask, a corrupt PNG."""
    pic, mask, bad = tmp_path / "pic.png", tmp_path / "mask.png", tmp_path / "bad.png"
    save_png(torch.rand(3, 20, 20) * 2 - 1, pic)
    m = -torch.ones(1, 9, 9)
    m[:, 2:6, 2:6] = 1
    save_png(m, mask)
    bad.write_bytes(b"\x89PNG not really")
    return pic, mask, bad


def test_cli_commands_write_files(tiny_digits_model, files, tmp_path):
    pic, mask, _ = files
    m = ["--model", str(tiny_digits_model), "--steps", "2"]
    out = tmp_path / "o.png"
    assert main(["img2img", str(pic), "a seven", "--strength", "0.5", *m, "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (16, 16)
    assert main(["inpaint", str(pic), str(mask), "a two", "--feather", "1", "--resample", "2",
                 *m, "--out", str(out)]) == 0  # fmt: skip
    gif = tmp_path / "walk.gif"
    assert main(["interpolate", str(pic), str(pic), "--label-a", "1", "--prompt-b", "seven",
                 "--frames", "3", *m, "--out", str(gif)]) == 0  # fmt: skip
    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.width >= 200  # scaled up, nearest
    assert main(["interpolate", "--seeds", "1", "2", "--frames", "2", *m, "--out", str(out)]) == 0
    assert main(["interpolate", "--seeds", "1", "2", "--frames", "2", "--guidance", "3",
                 "--guidance-interval", "1", "inf", *m, "--out", str(out)]) == 0  # fmt: skip


def test_cli_bad_input_is_one_line_exit_2(tiny_digits_model, files, tmp_path, capsys):
    pic, mask, bad = files
    m = ["--model", str(tiny_digits_model), "--steps", "2"]
    missing = str(tmp_path / "missing.png")
    for cmd in (["img2img"], ["inpaint"], ["interpolate", str(pic)]):
        extra = [str(mask)] if cmd == ["inpaint"] else []
        _one_line_error(capsys, [*cmd, missing, *extra, *m], "missing.png")
        _one_line_error(capsys, [*cmd, str(bad), *extra, *m], "bad.png")
        _one_line_error(capsys, [*cmd, str(pic), *extra, "--steps", "-2"], "steps")
    _one_line_error(capsys, ["img2img", str(pic), "--strength", "1.5", *m], "strength")
    _one_line_error(capsys, ["inpaint", str(pic), str(mask), "--strength", "-0.1", *m], "strength")
    _one_line_error(capsys, ["inpaint", str(pic), missing, *m], "missing.png")
    _one_line_error(capsys, ["inpaint", str(pic), str(bad), *m], "bad.png")
    _one_line_error(capsys, ["inpaint", str(pic), str(mask), "--resample", "0", *m], "resample")
    _one_line_error(capsys, ["interpolate", str(pic), *m], "two images")
    _one_line_error(capsys, ["interpolate", str(pic), str(pic), "--frames", "1", *m], "frames")
    _one_line_error(capsys, ["interpolate", str(pic), str(pic), "--label-a", "12", *m], "12")


def bar_count(err: str) -> tuple[int, int] | None:
    """(steps counted, total) of the last progress bar state on stderr, None without a bar."""
    states = re.findall(r"(\d+)/(\d+) \[", err)
    return tuple(map(int, states[-1])) if states else None


@pytest.mark.parametrize(
    ("args", "count"),
    [
        (["--steps", "4", "--strength", "0.5"], 2),
        (["--steps", "5", "--strength", "0.5"], 2),  # round(2.5) = 2, as the pipeline rounds
        (["--steps", "2", "--strength", "1", "--sampler", "heun"], 2),
        (["--steps", "3", "--strength", "0"], None),  # nothing to sample: no bar
    ],
)
def test_img2img_bar_counts_the_steps_of_the_tail(tiny_digits_model, files, tmp_path, capsys,
                                                  args, count):  # fmt: skip
    pic, out = files[0], str(tmp_path / "o.png")
    argv = ["img2img", str(pic), "a seven", "--model", str(tiny_digits_model), *args]
    assert main([*argv, "--out", out]) == 0
    assert bar_count(capsys.readouterr().err) == (None if count is None else (count, count))
    assert main([*argv, "--out", out, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("args", "count"),
    [
        (["--steps", "3"], 3),
        (["--steps", "3", "--resample", "2", "--jump", "2"], 6),  # each step of the tail twice
        (["--steps", "4", "--strength", "0.5", "--resample", "3"], 6),
    ],
)
def test_inpaint_bar_counts_repaints_repeated_steps(tiny_digits_model, files, tmp_path, capsys,
                                                   args, count):  # fmt: skip
    pic, mask, _ = files
    argv = ["inpaint", str(pic), str(mask), "a two", "--model", str(tiny_digits_model), *args]
    assert main([*argv, "--out", str(tmp_path / "o.png")]) == 0
    assert bar_count(capsys.readouterr().err) == (count, count)
    assert main([*argv, "--out", str(tmp_path / "o.png"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_interpolate_bar_counts_the_inversions_and_the_frames_run(
    tiny_digits_model, files, tmp_path, capsys
):
    """Between images: two inversions of steps - 1 intervals each, then one sampler run over
    every frame (3 + 2 + 2 = 7 at 3 steps); a walk between seeds is the frames' run alone."""
    pic = str(files[0])
    m, out = ["--model", str(tiny_digits_model), "--steps", "3"], str(tmp_path / "w.png")
    for ends, count in (([pic, pic, "--label-a", "1", "--label-b", "7"], 7),
                        (["--seeds", "1", "2"], 3)):  # fmt: skip
        assert main(["interpolate", *ends, "--frames", "3", *m, "--out", out]) == 0
        assert bar_count(capsys.readouterr().err) == (count, count)
        assert main(["interpolate", *ends, "--frames", "3", *m, "--out", out, "--quiet"]) == 0
        assert capsys.readouterr().err == ""
