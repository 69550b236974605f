"""`latentforge report trilemma`: quality, diversity and speed of samplers x NFE, as JSON, a
Markdown table and figures."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError
from .options import batch_option, device_options, json_option, quiet_option, seed_option


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.group("report")
def report_group() -> None:
    """Reports that combine several measurements into tables and figures."""


@report_group.command("trilemma")
@click.option("--model", "models", multiple=True,
              help="model folder (repeatable; default: the embedded model)")  # fmt: skip
@click.option("--samplers", default="ddim,euler_ancestral,heun,dpmpp_2m,unipc", show_default=True,
              help="comma-separated sampler names")  # fmt: skip
@click.option("--nfe", "nfes", default="1,2,4,8,16,32", show_default=True, callback=_int_list,
              help="comma-separated budgets of denoiser calls per image")  # fmt: skip
@click.option("--n", "n", type=click.IntRange(min=4), default=1000, show_default=True,
              help="images per cell (and reference images)")  # fmt: skip
@click.option("--ref", default=None, help="reference set (default: each model's data, stream 1)")
@click.option("--features", default="pixels", show_default=True,
              help="feature network (as eval fid: pixels, shapes, inception:FILE)")  # fmt: skip
@click.option("--resize", type=click.Choice(["clean", "tf", "torch"]), default="clean",
              show_default=True, help="inception features: the resize to 299")  # fmt: skip
@click.option("--guidance", type=float, default=None, help="guidance scale (model default)")
@click.option("--per-prompt", type=click.IntRange(min=0), default=4, show_default=True,
              help="images per prompt for the per-prompt diversity (0: skip it)")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False), default="trilemma", show_default=True,
              help="folder for trilemma.json, trilemma.md and the figures")  # fmt: skip
@seed_option()
@batch_option(help="images per sampling batch")
@device_options
@json_option
@quiet_option
def trilemma_cmd(models, samplers, nfes, n, ref, features, resize, guidance, per_prompt, out,
                 seed, batch, device, dtype, as_json, quiet) -> None:  # fmt: skip
    """Quality (FID, precision), diversity (recall, coverage, per-prompt spread) and speed
    (NFE, seconds per image) of every sampler at every NFE budget."""
    from ..io.checkpoint import default_cache_dir
    from ..io.model_folder import load_diffusion_model
    from ..metrics.trilemma import markdown_table, trilemma, write_report
    from ..sampling import SAMPLERS

    names = [s.strip() for s in samplers.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SAMPLERS))
    if unknown:
        raise UserError(f"unknown sampler(s) {unknown}; choose from {sorted(SAMPLERS)}")
    loaded = [load_diffusion_model(m, device=device, dtype=dtype) for m in (models or [None])]
    rows = trilemma(
        loaded, samplers=names, nfes=nfes, n=n, ref=ref, features=features, resize=resize,
        guidance=guidance, seed=seed, per_prompt=per_prompt, batch=batch,
        cache_dir=default_cache_dir(), progress=not quiet,
    )  # fmt: skip
    meta = {"models": [str(m.path) for m in loaded], "samplers": names, "nfe": nfes, "n": n,
            "features": features, "seed": seed, "device": device, "dtype": dtype}  # fmt: skip
    files = write_report(rows, Path(out), meta)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(markdown_table(rows))
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))
