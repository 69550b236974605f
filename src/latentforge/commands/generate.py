"""`latentforge generate` (prompt -> PNG, or reproduce a PNG) and `latentforge sample` (a grid)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .common import parse_label, progress
from .options import (
    control_options,
    control_request,
    device_options,
    embedding_options,
    guidance_interval_option,
    guidance_option,
    layout_option,
    lora_option,
    model_option,
    negative_option,
    out_option,
    quiet_option,
    sampling_options,
    sdxl_options,
    size_options,
)


@click.command()
@model_option(help="model folder", required=True)
@click.option("--label", default=None, help="class index or name (class models)")
@guidance_option()
@guidance_interval_option
@size_options
@device_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="grid PNG")
@sampling_options
@quiet_option
def sample(model_dir, label, guidance, guidance_interval, width, height, vae_tiling,
           device, dtype, out, sampler, steps, spacing, options, seed, num, bf16,
           quiet) -> None:  # fmt: skip
    """Sample a grid of images from a model folder."""
    from ..io.images import save_grid
    from ..io.model_folder import load_diffusion_model
    from ..pipelines.generate import generate
    from ..pipelines.settings import SampleSettings

    model = load_diffusion_model(model_dir, device=device, dtype=dtype)
    labels = None
    if label is not None:
        labels = [parse_label(label, model.class_names, model.num_classes)]
    settings = SampleSettings.build(
        sampler=sampler, steps=steps, spacing=spacing, guidance=guidance,
        guidance_interval=guidance_interval, seed=seed, num=num, bf16=bf16, knobs=options,
        width=width, height=height, vae_tiling=vae_tiling,
    )  # fmt: skip
    total = settings.resolve(model).steps  # every sampler calls back once per step
    with progress(total, "sampling", quiet) as callback:
        images = generate(model, settings, labels=labels, callback=callback)
    save_grid(images, out, seed=seed, sampler=sampler or "", steps=steps or "")
    click.echo(f"wrote {num} image(s) to {out}")


@click.command()
@click.argument("prompt", required=False)
@model_option(help="model folder")
@negative_option
@guidance_option()
@guidance_interval_option
@layout_option
@click.option("--region", "regions", multiple=True, type=(str, float, float, float, float),
              metavar="PROMPT X0 Y0 X1 Y1",
              help="draw PROMPT inside the box (fractions of the side, origin top left); "
              "repeat for more regions; replaces --layout")  # fmt: skip
@size_options
@sdxl_options
@device_options
@out_option()
@click.option("--preview", type=click.Path(dir_okay=False), default=None,
              help="GIF of the x0-estimate at every step")  # fmt: skip
@click.option("--from-png", type=click.Path(dir_okay=False), default=None,
              help="reproduce a PNG made by generate (or by A1111: its parameters chunk) from "
              "its embedded parameters")  # fmt: skip
@click.option("--refiner", type=click.Path(file_okay=False), default=None,
              help="SDXL: a refiner model folder that takes over the last steps")  # fmt: skip
@click.option("--refiner-start", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="with --refiner: the share of the schedule the base runs")  # fmt: skip
@lora_option
@embedding_options
@control_options
@sampling_options
@quiet_option
def generate(prompt, model_dir, negative, guidance, guidance_interval, layout, regions, device,
             dtype, out, preview, from_png, refiner, refiner_start, quiet,
             **opts) -> None:  # fmt: skip
    """Generate images for PROMPT, e.g. "a small red circle above a blue square"."""
    from ..guidance import Region
    from ..io.embeddings import embedding_records, used_embeddings
    from ..io.lora import LoraSpec, find_lora_files
    from ..io.model_folder import ModelFolder, default_model_dir
    from ..pipelines.generate import generate_to_png, settings_from_png
    from ..pipelines.settings import SampleSettings

    loras = opts.pop("loras")
    embeddings, embeddings_dir = opts.pop("embeddings"), opts.pop("embeddings_dir")
    control = control_request(opts)
    if from_png:  # everything but --model, --out and --preview comes from the PNG
        prompt, settings, png_model = settings_from_png(from_png)
        model_dir = model_dir or png_model
        # LoRAs are recorded by name: the files next to the PNG, or those of --lora
        files = find_lora_files(settings.loras, Path(from_png).parent, loras)
    elif prompt is None:
        raise UserError("give a PROMPT (or --from-png FILE)")
    else:
        settings = SampleSettings.build(
            negative=negative, guidance=guidance, guidance_interval=guidance_interval,
            layout=layout, regions=[Region(r[0], tuple(r[1:])) for r in regions],
            knobs=opts.pop("options"), **opts,
        )  # fmt: skip
        files = [LoraSpec.parse(spec) for spec in loras]
    settings = settings.replace(loras=tuple(f.text for f in files))  # applied where it loads
    # the steps as generate_to_png will resolve them, read from model.json before it loads
    folder = ModelFolder.read(default_model_dir() if model_dir is None else model_dir)
    records = embedding_records(folder, embeddings, embeddings_dir)
    missing = sorted(set(settings.embeddings) - {e.label for e in records})
    if from_png and missing:
        names = ", ".join(missing)
        click.echo(
            f"latentforge: warning: {from_png} was made with the embedding(s) {names}, "
            "not loaded now (pass --embedding FILE)",
            err=True,
        )
    # the embeddings the prompts use, recorded as TRIGGER:HASH
    used = used_embeddings(records, prompt or "", settings.negative)
    settings = settings.replace(embeddings=tuple(used))
    with progress(settings.resolve(folder).steps, "sampling", quiet) as callback:
        info = generate_to_png(
            model_dir, out, prompt=prompt, preview=preview, settings=settings, callback=callback,
            device=device, dtype=dtype, embeddings=embeddings, embeddings_dir=embeddings_dir,
            control=control, refiner=refiner, refiner_start=refiner_start,
        )  # fmt: skip
    click.echo(f"wrote {info['num']} image(s) ({info['conditioning']}) to {out}")
