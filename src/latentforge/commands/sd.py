"""`latentforge import SRC DST` and `latentforge export DIR --format diffusers DST`."""

from __future__ import annotations

import click

from ..errors import UserError

_DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _heads(value: str | None) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    try:
        heads = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"--num-heads takes an int or a comma list, got {value!r}") from None
    return heads[0] if len(heads) == 1 else heads


@click.command("import")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path(file_okay=False))
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="accept .ckpt/.bin pickles (loaded with torch.load(weights_only=True))",
)
@click.option(
    "--dtype",
    type=click.Choice(sorted(_DTYPES)),
    default="keep",
    show_default=True,
    help="precision of the written weights",
)
@click.option(
    "--prediction",
    type=click.Choice(["eps", "v"]),
    default=None,
    help="single files: override the guess (SD 1.x eps; SD 2.x 768-v v)",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    default=None,
    help="single files: training resolution in pixels (SD 1.x 512; SD 2.x 768)",
)
@click.option(
    "--tokenizer",
    type=click.Path(file_okay=False),
    default=None,
    help="a CLIP tokenizer folder to copy (single files hold none)",
)
@click.option(
    "--num-heads",
    default=None,
    help="single files: attention heads, an int or one per level (e.g. 5,10,20,20)",
)
def import_cmd(src, dst, allow_pickle, dtype, prediction, image_size, tokenizer, num_heads) -> None:
    """Import Stable Diffusion weights (a diffusers folder or a single .safetensors) into a
    native latent model folder DST; a ControlNet (a diffusers ControlNetModel folder or an
    original control_*.safetensors) into a ControlNet folder."""  # fmt: skip
    import torch

    from ..io.controlnet import import_controlnet, is_controlnet
    from ..io.diffusers_format import import_model

    if is_controlnet(src, allow_pickle):
        info = import_controlnet(
            src, dst, allow_pickle=allow_pickle, num_heads=_heads(num_heads),
            dtype=getattr(torch, _DTYPES[dtype]) if _DTYPES[dtype] else None,
        )  # fmt: skip
        click.echo(
            f"imported {info['format']} ControlNet: {info['parameters']:,} parameters, "
            f"preprocess {info['preprocess']} -> {dst}"
        )
        for note in info["notes"]:
            click.echo(f"note: {note}")
        return
    info = import_model(
        src, dst, allow_pickle,
        dtype=getattr(torch, _DTYPES[dtype]) if _DTYPES[dtype] else None,
        prediction=prediction, image_size=image_size, tokenizer=tokenizer,
        num_heads=_heads(num_heads),
    )  # fmt: skip
    click.echo(
        f"imported {info['format']} checkpoint: U-Net {info['unet_parameters']:,} parameters, "
        f"VAE, {'CLIP text encoder' if info['text_encoder'] else 'no text encoder'} -> {dst}"
    )
    for note in info["notes"]:
        click.echo(f"note: {note}")


@click.command("export")
@click.argument("src", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["diffusers", "single-file"]),
              default="diffusers", show_default=True)  # fmt: skip
@click.argument("dst", type=click.Path())
def export(src, fmt, dst) -> None:
    """Export the native model folder SRC as a diffusers folder (or one LDM .safetensors) DST;
    a ControlNet folder as a diffusers ControlNetModel folder."""
    from ..io.controlnet import export_controlnet
    from ..io.diffusers_format import export_model
    from ..io.model_folder import read_model_meta

    if read_model_meta(src).kind == "controlnet":
        if fmt != "diffusers":
            raise UserError(f"a ControlNet exports to --format diffusers only, not {fmt}")
        info = export_controlnet(src, dst)
    else:
        info = export_model(src, dst, fmt)
    click.echo(f"exported {src} as {fmt} -> {dst}")
    for note in info["notes"]:
        click.echo(f"note: {note}")
