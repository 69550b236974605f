"""`latentforge upscale`: load an image, call `pipelines.superres.upscale`, write a PNG."""

from __future__ import annotations

import click

from .common import progress, resolved_steps, save_images
from .options import (
    device_options,
    model_option,
    out_option,
    quiet_option,
    sampler_option,
    seed_option,
    steps_option,
)


def _scale(ctx, param, value):
    return None if value is None else int(value)


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@model_option(help="super-resolution model folder (default: the embedded upscaler)")
@click.option(
    "--scale",
    type=click.Choice(["2", "4"]),
    default=None,
    callback=_scale,
    help="upscaling factor; must be the model's (default: the model's)",
)
@click.option(
    "--noise-level",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="noise added to the low-res input (trained on 0-0.3; more invents more)",
)
@steps_option(help="steps (model default)")
@sampler_option(help="sampler name (model default)")
@seed_option()
@click.option(
    "--tile",
    type=click.IntRange(min=2),
    default=None,
    help="tile size in output pixels (default: the model's resolution)",
)
@click.option(
    "--tile-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="tiles per sampler call: bounds peak memory whatever the image size",
)
@device_options
@out_option(default="upscaled.png")
@quiet_option
def upscale(image, model_dir, scale, noise_level, steps, sampler, seed, tile, tile_batch, device,
            dtype, out, quiet) -> None:  # fmt: skip
    """Upscale IMAGE with a super-resolution model (tiled when larger than the model)."""
    from ..io.images import load_image
    from ..io.model_folder import load_diffusion_model
    from ..pipelines.superres import require_default_upscaler, sampler_runs
    from ..pipelines.superres import upscale as run

    model = load_diffusion_model(model_dir or require_default_upscaler(), device=device,
                                 dtype=dtype)  # fmt: skip
    picture = load_image(image, model.output_shape[0])
    params = {"scale": scale, "noise_level": noise_level, "steps": steps, "sampler": sampler,
              "seed": seed, "tile": tile, "tile_batch": tile_batch}  # fmt: skip
    # the tiles go through the sampler in bounded batches: each batch calls back every step
    runs = sampler_runs(model, *picture.shape[-2:], tile=tile, tile_batch=tile_batch)
    with progress(runs * resolved_steps(model, steps), "upscaling", quiet) as callback:
        result = run(model, picture, callback=callback, **params)
    save_images(result, out, **{k: v for k, v in params.items() if v is not None})
    (_, h, w), (H, W) = picture.shape, result.shape[-2:]
    click.echo(f"wrote {h}x{w} -> {H}x{W} (x{model.meta.scale}) to {out}")
