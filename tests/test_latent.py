"""Latent diffusion end to end with tiny configs: VAE training, --vae training, decode, previews."""

import json
import math
import shutil

import pytest
import torch

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.io.images import read_png_metadata
from latentforge.io.model_folder import load_diffusion_model, load_vae
from latentforge.pipelines.generate import generate
from latentforge.training import TrainConfig, VAETrainConfig, train_diffusion, train_vae


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    cfg = VAETrainConfig(
        data="shapes:32", out=str(out), max_steps=3, batch_size=4, sample_every=0,
        ckpt_every=3, eval_images=32, quiet=True,
    )  # fmt: skip
    assert train_vae(cfg) == 0
    return out


def test_vae_folder_has_scaling_factor_and_psnr(tiny_vae):
    meta = json.loads((tiny_vae / "model.json").read_text())
    assert meta["kind"] == "vae" and meta["scaling_factor"] > 0
    assert meta["eval"]["eval_images"] == 32 and meta["eval"]["psnr_db"] > 0
    vae, _ = load_vae(tiny_vae)
    assert vae.downsample_factor == 4


def test_scaling_factor_gives_unit_variance_latents(tiny_vae):
    """Measured on held-out images; on other images the scaled latents are still ~unit std."""
    from latentforge.data import load_dataset

    vae, meta = load_vae(tiny_vae)
    ds = load_dataset("shapes:32", seed=5)
    x = torch.stack([ds[i]["image"] for i in range(64)])
    z = vae.encode(x).sample(torch.Generator().manual_seed(0)) * meta.scaling_factor
    assert 0.8 < z.std().item() < 1.25


def test_vae_decoder_only_fine_tune_keeps_the_latent_space(tiny_vae, tmp_path):
    """--init-from --decoder-only: encoder, quant_conv and scaling factor stay the source's bit
    for bit (diffusion models trained on its latents can swap the new decoder in); the decoder
    trains, with the discriminator too; it resumes exactly."""
    from safetensors.torch import load_file

    def cfg(out, steps):
        return VAETrainConfig(
            data="shapes:32", out=str(out), init_from=str(tiny_vae), decoder_only=True,
            max_steps=steps, batch_size=2, lr=1e-2, disc_start=1, sample_every=0,
            ckpt_every=2, eval_images=32, quiet=True,
        )  # fmt: skip

    assert train_vae(cfg(tmp_path / "a", 4)) == 0
    src, new = (
        load_file(tiny_vae / "model.safetensors"),
        load_file(tmp_path / "a/model.safetensors"),
    )
    assert src.keys() == new.keys()
    frozen = [k for k in src if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(src[k], new[k]) for k in frozen)
    assert any(not torch.equal(src[k], new[k]) for k in src if k.startswith("decoder."))
    meta, src_meta = (
        json.loads((d / "model.json").read_text()) for d in (tmp_path / "a", tiny_vae)
    )
    assert meta["scaling_factor"] == src_meta["scaling_factor"]
    assert meta["init_from"]["decoder_only"] and meta["vae"] == src_meta["vae"]
    train_vae(cfg(tmp_path / "b", 2))
    train_vae(cfg(tmp_path / "b", 4), resume=True)
    for name in ("model", "optimizer"):
        a = load_file(tmp_path / "a/checkpoints/step-0000004" / f"{name}.safetensors")
        b = load_file(tmp_path / "b/checkpoints/step-0000004" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_vae_init_from_errors(tiny_vae, tmp_path):
    base = dict(data="shapes:32", out=str(tmp_path / "x"), max_steps=1, batch_size=2,
                sample_every=0, quiet=True)  # fmt: skip
    with pytest.raises(UserError, match="--init-from"):
        train_vae(VAETrainConfig(decoder_only=True, **base))
    other = tmp_path / "unet"
    shutil.copytree(tiny_vae, other)
    meta = json.loads((other / "model.json").read_text())
    as_diffusion = {**meta, "kind": "diffusion", "unet": {}, "parameterization": {"type": "vp"}}
    (other / "model.json").write_text(json.dumps(as_diffusion))
    with pytest.raises(UserError, match="not a VAE"):
        train_vae(VAETrainConfig(init_from=str(other), **base))
    with pytest.raises(UserError, match="channel"):
        train_vae(VAETrainConfig(**{**base, "data": "digits:16"}, init_from=str(tiny_vae)))


@pytest.mark.parametrize("cache", [False, True])
def test_latent_diffusion_end_to_end(tiny_vae, tmp_path, cache):
    cfg = TrainConfig(
        data="shapes:32", out=str(tmp_path), vae=str(tiny_vae), cache_latents=cache,
        max_steps=2, batch_size=4, sample_every=0, quiet=True,
    )  # fmt: skip
    if cache:  # the cache needs a bounded dataset
        cfg.data = "shapes:32:64"
    assert train_diffusion(cfg) == 0
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["data"]["resolution"] == 8 and meta["latent"]["image_resolution"] == 32
    assert (tmp_path / "vae" / "model.json").is_file()  # the folder carries its VAE
    model = load_diffusion_model(tmp_path)
    seen = []
    images = generate(model, num=2, steps=3, callback=lambda i, s, x, d: seen.append(x.shape))
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert seen == [(2, 4, 8, 8)] * 3  # once per step, in latent space


def test_preview_gif_and_from_png_round_trip(tiny_digits_model, tmp_path):
    out, gif = tmp_path / "a.png", tmp_path / "steps.gif"
    args = ["generate", "a four", "--model", str(tiny_digits_model), "--steps", "3"]
    assert (
        main([*args, "--seed", "11", "--num", "2", "--out", str(out), "--preview", str(gif)]) == 0
    )
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 4  # three steps + the final image
    meta = read_png_metadata(out)
    assert meta["seed"] == "11" and meta["steps"] == "3" and meta["prompt"] == "a four"
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


def test_latent_errors(tiny_vae, tiny_digits_model, tmp_path):
    with pytest.raises(UserError, match="channel"):
        train_diffusion(TrainConfig(data="digits", out=str(tmp_path), vae=str(tiny_vae)))
    with pytest.raises(UserError, match="not a VAE"):
        load_vae(tiny_digits_model)


def test_cheap_preview_uses_the_fitted_map(tiny_vae, tmp_path):
    meta = json.loads((tiny_vae / "model.json").read_text())
    assert len(meta["latent_rgb"]) == 3 and len(meta["latent_rgb"][0]) == 5  # (3, C + 1)
    cfg = TrainConfig(data="shapes:32", out=str(tmp_path), vae=str(tiny_vae), max_steps=1,
                      batch_size=2, sample_every=0, quiet=True)  # fmt: skip
    train_diffusion(cfg)
    model = load_diffusion_model(tmp_path)
    z = torch.randn(2, 4, 8, 8)
    assert model.preview(z).shape == (2, 3, 8, 8)  # latent resolution, no decoder pass


@pytest.mark.parametrize("crop", [0, 12])
def test_vae_with_patch_discriminator_resumes_exactly(tmp_path, crop):
    """The discriminator and its optimizer are checkpointed: resume == uninterrupted run (also
    when training on random crops, whose real crops for the discriminator are seeded too)."""
    from safetensors.torch import load_file

    def cfg(out, steps):
        return VAETrainConfig(
            data="shapes:16", out=str(out), max_steps=steps, batch_size=2, disc_start=1,
            sample_every=0, ckpt_every=2, eval_images=8, crop=crop, quiet=True,
        )  # fmt: skip

    train_vae(cfg(tmp_path / "a", 4))
    train_vae(cfg(tmp_path / "b", 2))
    train_vae(cfg(tmp_path / "b", 4), resume=True)
    for name in ("model", "disc", "disc_optimizer"):
        a = load_file(tmp_path / "a/checkpoints/step-0000004" / f"{name}.safetensors")
        b = load_file(tmp_path / "b/checkpoints/step-0000004" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_edge_map_marks_the_pixels_at_and_next_to_a_step():
    from latentforge.training.vae_train import edge_map

    x = -torch.ones(2, 3, 8, 8)
    x[0, 1, 2:5, 3:6] = 1.0  # a green square in one channel
    x[1, :, :, 4:] = -0.95  # a step below the threshold
    e = edge_map(x)
    assert e.shape == (2, 1, 8, 8) and not e[1].any()
    step = torch.zeros(8, 8)  # pixels on either side of the square's border ...
    step[2:5, [2, 3, 5, 6]] = 1.0
    step[[1, 2, 4, 5], 3:6] = 1.0
    want = torch.nn.functional.max_pool2d(step[None, None], 3, 1, 1)[0, 0]  # ... dilated
    assert torch.equal(e[0, 0], want)


def test_edge_weighted_vae_loss_trains_and_is_resume_checked(tmp_path):
    def cfg(steps, w):
        return VAETrainConfig(
            data="shapes:16", out=str(tmp_path), max_steps=steps, batch_size=2, edge_weight=w,
            sample_every=0, ckpt_every=1, eval_images=4, quiet=True,
        )  # fmt: skip

    assert train_vae(cfg(1, 5.0)) == 0
    with pytest.raises(UserError, match="edge-weight"):
        train_vae(cfg(2, 0.0), resume=True)
    assert train_vae(cfg(2, 5.0), resume=True) == 0


def test_vae_trains_on_crops_and_evaluates_on_whole_held_out_images(tmp_path, monkeypatch):
    from latentforge.data import load_dataset
    from latentforge.models.vae import AutoencoderKL
    from latentforge.training.vae_train import VAETrainer

    sizes = []
    forward = AutoencoderKL.forward

    def spy(self, x, *args, **kwargs):
        sizes.append(x.shape[-1])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "forward", spy)
    cfg = VAETrainConfig(
        data="shapes:32", out=str(tmp_path), max_steps=2, batch_size=3, crop=16,
        sample_every=0, ckpt_every=2, eval_images=4, quiet=True,
    )  # fmt: skip
    assert train_vae(cfg) == 0
    assert sizes == [16, 16]  # the training forwards saw crops only
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["eval"]["eval_images"] == 4 and meta["training"]["config"]["crop"] == 16

    # held-out images: the next shapes stream (seed + 1), not the training stream
    held = VAETrainer(cfg)._held_out()
    assert held.shape == (4, 3, 32, 32)
    other = load_dataset("shapes:32", seed=1)
    assert torch.equal(held, torch.stack([other[i]["image"] for i in range(4)]))
    train = load_dataset("shapes:32", seed=0)
    assert not torch.equal(held[0], train[0]["image"])

    with pytest.raises(UserError, match="multiple of 4"):
        train_vae(VAETrainConfig(data="shapes:32", out=str(tmp_path / "bad"), crop=18))
    with pytest.raises(UserError, match="at most the image size"):
        train_vae(VAETrainConfig(data="shapes:32", out=str(tmp_path / "bad"), crop=64))


def test_cli_prediction_default_is_v_for_latent_models(tiny_vae, tmp_path):
    """Unstated --prediction: v in latent space (no range to clip eps models' x0 estimates to),
    eps in pixel space; a stated one is kept."""
    common = ["--data", "shapes:16", "--max-steps", "1", "--batch-size", "2",
              "--sample-every", "0", "--quiet"]  # fmt: skip
    runs = {
        "latent": ["--vae", str(tiny_vae)],
        "pixel": [],
        "latent-eps": ["--vae", str(tiny_vae), "--prediction", "eps"],
    }
    for name, extra in runs.items():
        assert main(["train", "diffusion", *common, *extra, "--out", str(tmp_path / name)]) == 0
    pred = {n: json.loads((tmp_path / n / "model.json").read_text())["parameterization"]
            ["prediction"] for n in runs}  # fmt: skip
    assert pred == {"latent": "v", "pixel": "eps", "latent-eps": "eps"}


def test_cache_dir_stores_and_reuses_the_tables(tiny_vae, tmp_path, monkeypatch):
    """--cache-dir: the first run stores the latent moments and the caption table; a second
    run (or a resume) on the same data, VAE and text encoder reads them back, bit-exactly, and
    calls neither the VAE encoder nor MiniLM. Another VAE gives another file."""
    from latentforge.models.vae import AutoencoderKL
    from latentforge.training.diffusion import DiffusionTrainer

    def cfg(out, vae=tiny_vae):
        return TrainConfig(
            data="shapes:32:24", out=str(out), vae=str(vae), cond="text", cache_latents=True,
            cache_text=True, cache_dir=str(tmp_path / "cache"), max_steps=1, batch_size=4,
            sample_every=0, quiet=True,
        )  # fmt: skip

    first = DiffusionTrainer(cfg(tmp_path / "a"))
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("the stored tables should have been used")

    monkeypatch.setattr(AutoencoderKL, "encode", forbidden)
    from latentforge.models.text import MiniLMEncoder

    monkeypatch.setattr(MiniLMEncoder, "_encode", forbidden)
    second = DiffusionTrainer(cfg(tmp_path / "b"))
    assert second._cache["caption"] == first._cache["caption"]
    assert torch.equal(second._cache["moments"], first._cache["moments"])
    for k in ("hidden", "mask", "rows"):
        assert torch.equal(second._text_table[k], first._text_table[k])
    assert math.isfinite(second.train_step())  # a step runs from the stored tables

    other_vae = tmp_path / "vae2"
    shutil.copytree(tiny_vae, other_vae)
    weights = other_vae / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight changes: another digest
    weights.write_bytes(bytes(data))
    monkeypatch.undo()
    DiffusionTrainer(cfg(tmp_path / "c", other_vae))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_cache_dir_reuses_a_caption_table_alone(tmp_path, monkeypatch):
    """Data too large to keep in memory (or --task inpaint, which cannot cache latents): the
    file holds only the caption table, and a second run still reads it instead of encoding."""
    from latentforge.models.text import MiniLMEncoder
    from latentforge.training import loop
    from latentforge.training.diffusion import DiffusionTrainer

    monkeypatch.setattr(loop, "CACHE_ELEMENTS", 0)  # nothing is kept in memory
    cfg = dict(data="shapes:16:24", cond="text", cache_text=True, max_steps=1, batch_size=4,
               cache_dir=str(tmp_path / "cache"), sample_every=0, quiet=True)  # fmt: skip
    first = DiffusionTrainer(TrainConfig(out=str(tmp_path / "a"), **cfg))
    assert first._cache is None and first._text_table is not None
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("the stored caption table should have been used")

    monkeypatch.setattr(MiniLMEncoder, "_encode", forbidden)
    second = DiffusionTrainer(TrainConfig(out=str(tmp_path / "b"), **cfg))
    assert second._cache is None
    for k in ("hidden", "mask", "rows"):
        assert torch.equal(second._text_table[k], first._text_table[k])
    assert math.isfinite(second.train_step())
