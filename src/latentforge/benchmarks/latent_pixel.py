"""`latentforge bench latent-vs-pixel`: the latent-diffusion speed-up (Rombach et al. 2022).

Same U-Net preset, same data (shapes:64 by default): a pixel model on 3x64x64 images against a
latent model on the 4x16x16 latents of an f=4 VAE. Prints training images/s (latents encoded
per step, and cached once), sampling images/s at 20 NFE including the VAE decode, and, when
trained models are given, a quality figure for each (Fréchet distance on 8x8-pooled pixels
against held-out images, lower is better; `quality_ratio` is latent / pixel) plus the VAE's
reconstruction PSNR and SSIM on held-out images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from .. import sampling
from ..data import held_out_images, load_dataset
from ..denoisers import make_denoiser
from ..io.model_folder import (
    DataInfo,
    LatentInfo,
    LoadedModel,
    ModelMeta,
    load_diffusion_model,
    load_vae,
    read_model_meta,
)
from ..metrics.fd import fd
from ..metrics.vae_eval import evaluate_vae
from ..models.presets import unet_preset
from ..models.unet import UNet
from ..models.vae import AutoencoderKL, vae_preset
from ..pipelines.generate import generate
from . import CONTEXT, one_line, script_main

PARAM = {"type": "vp", "prediction": "eps", "beta_schedule": "cosine"}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _train_rate(den, opt, x_fn, batch: int, repeats: int) -> float:
    def step():
        loss = den.loss(x_fn(), torch.Generator().manual_seed(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch / _timed(step, repeats)


def _model(folder, preset, shape, vae=None, scaling=1.0) -> LoadedModel:
    if folder:
        return load_diffusion_model(folder)
    c, r = shape[0], shape[1]
    den = make_denoiser(UNet(unet_preset(preset, in_channels=c, out_channels=c)), PARAM)
    latent = None
    if vae is not None:
        latent = LatentInfo(scaling_factor=scaling, image_resolution=r * 4, image_channels=3)
    meta = ModelMeta(
        kind="diffusion",
        unet={"num_classes": 0},
        parameterization=PARAM,
        data=DataInfo(resolution=r, channels=c),
        latent=latent,
    )
    return LoadedModel(meta, denoiser=den.eval(), vae=vae)


def run(*, data: str, preset: str, batch_size: int, nfe: int, repeats: int, vae_dir: str | None,
        pixel_model: str | None, latent_model: str | None, quality_n: int) -> dict:  # fmt: skip
    """The benchmark's record (the module docstring); quality only given both model folders."""
    torch.manual_seed(0)
    ds = load_dataset(data)
    images = torch.stack([ds[i]["image"] for i in range(batch_size)])
    if not vae_dir and latent_model:  # a latent model folder carries its VAE
        latent = read_model_meta(latent_model).latent
        vae_dir = str(Path(latent_model) / (latent.vae if latent else "vae"))
    vae_eval = None
    if vae_dir:
        vae, vae_meta = load_vae(vae_dir)
        scaling = vae_meta.scaling_factor or 1.0
        vae_eval = evaluate_vae(vae, vae_meta, n=quality_n, data=data)
    else:
        vae, scaling = AutoencoderKL(vae_preset("f4-tiny")).eval(), 1.0
    f, lc = vae.downsample_factor, vae.latent_channels
    res = ds.resolution

    pixel = _model(pixel_model, preset, (3, res))
    latent = _model(latent_model, preset, (lc, res // f), vae, scaling)

    # training throughput (fresh trainable copies so timings do not depend on loaded weights)
    p_den = make_denoiser(UNet(unet_preset(preset)).train(), PARAM)
    l_den = make_denoiser(UNet(unet_preset(preset, in_channels=lc, out_channels=lc)).train(), PARAM)
    p_opt = torch.optim.AdamW(p_den.parameters(), lr=1e-4)
    l_opt = torch.optim.AdamW(l_den.parameters(), lr=1e-4)
    with torch.no_grad():
        cached = vae.encode(images).sample(torch.Generator().manual_seed(0)) * scaling

    def encode_per_step():
        with torch.no_grad():
            return vae.encode(images).sample(torch.Generator().manual_seed(0)) * scaling

    train_pixel = _train_rate(p_den, p_opt, lambda: images, batch_size, repeats)
    train_latent = _train_rate(l_den, l_opt, encode_per_step, batch_size, repeats)
    train_cached = _train_rate(l_den, l_opt, lambda: cached, batch_size, repeats)

    def sampler(model):
        return lambda: generate(model, num=batch_size, steps=nfe, sampler="ddim")

    sample_pixel = batch_size / _timed(sampler(pixel), 1)
    sample_latent = batch_size / _timed(sampler(latent), 1)

    result = {
        "data": data,
        "preset": preset,
        "batch_size": batch_size,
        "nfe": nfe,
        "threads": torch.get_num_threads(),
        "pixel_shape": [3, res, res],
        "latent_shape": [lc, res // f, res // f],
        "train_images_per_s": {
            "pixel": round(train_pixel, 2),
            "latent": round(train_latent, 2),
            "latent_cached": round(train_cached, 2),
        },
        "sample_images_per_s": {"pixel": round(sample_pixel, 2), "latent": round(sample_latent, 2)},
        "train_speedup": round(train_latent / train_pixel, 2),
        "train_speedup_cached": round(train_cached / train_pixel, 2),
        "sample_speedup": round(sample_latent / sample_pixel, 2),
        "quality_metric": "fd_pooled8 (Fréchet distance, 8x8-pooled RGB, lower is better)",
        "quality_pixel": None,
        "quality_latent": None,
        "quality_ratio": None,
        "vae_psnr_db": vae_eval and vae_eval["psnr_db"],
        "vae_ssim": vae_eval and vae_eval["ssim"],
    }
    if pixel_model and latent_model:
        # held-out real images (stream 1; training draws from stream 0), DDIM at --nfe for both
        real = held_out_images(data, quality_n, 1)
        for name, model in (("pixel", pixel), ("latent", latent)):
            fake = torch.cat([
                generate(model, num=min(64, quality_n - s), seed=s, steps=nfe, sampler="ddim")
                for s in range(0, quality_n, 64)
            ])  # fmt: skip
            result[f"quality_{name}"] = round(fd(fake, real), 4)
        result["quality_ratio"] = round(result["quality_latent"] / result["quality_pixel"], 3)
    return result


@click.command(
    "latent-vs-pixel", help=__doc__, short_help=one_line(__doc__), context_settings=CONTEXT
)
@click.option("--data", default="shapes:64", show_default=True)
@click.option("--preset", default="tiny", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--nfe", type=int, default=20, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="timed training steps")
@click.option("--vae", "vae_dir", default=None, metavar="DIR",
              help="trained VAE folder (default: the --latent-model's)")  # fmt: skip
@click.option("--pixel-model", default=None, metavar="DIR",
              help="trained pixel model folder (quality)")  # fmt: skip
@click.option("--latent-model", default=None, metavar="DIR",
              help="trained latent model folder (quality)")  # fmt: skip
@click.option("--quality-n", type=int, default=512, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def command(as_json: bool, **kw) -> int:
    sampling.get_sampler("ddim")
    result = run(**kw)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python bench/latent_vs_pixel.py ARGS`: the same as `latentforge bench latent-vs-pixel`."""
    return script_main(command, argv)
