"""`latentforge lora merge`: a new model folder with LoRAs fused into its weights."""

from __future__ import annotations

import click


@click.group("lora")
def lora_group() -> None:
    """Work with LoRA files (kohya/A1111 or diffusers .safetensors; docs/lora.md)."""


@lora_group.command("merge")
@click.argument("model", type=click.Path(file_okay=False))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:SCALE]...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new model folder")
def merge(model: str, loras: tuple[str, ...], out: str) -> None:
    """Fuse LORA files (each at SCALE, default 1) into MODEL's U-Net and CLIP text encoder,
    written as a new model folder (then `export --format diffusers` or `single-file`)."""
    from ..io.lora import merge_loras

    info = merge_loras(model, loras, out)
    click.echo(f"merged {', '.join(info['loras'])} into {', '.join(info['parts'])}: {out}")
