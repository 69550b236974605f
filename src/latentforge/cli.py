"""The `latentforge` command: parses arguments, calls the library, prints. Nothing else."""

from __future__ import annotations

import sys

import click

from .commands import guidance_interval_option, layout_option
from .errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="latentforge")
def cli() -> None:
    """latentforge: train, sample, edit and serve diffusion models."""


# ----- train -----------------------------------------------------------------------------------
oversample_option = click.option(
    "--oversample", metavar="WORDS=FACTOR", multiple=True,
    help="shapes data: draw images holding such an object FACTOR times as often, e.g. "
         "'small star=3' (size, colour and/or shape words, optionally 'on COLOUR' for the "
         "background: 'blue star on gray=4'; repeatable; draws with replacement)",
)  # fmt: skip


@cli.group()
def train() -> None:
    """Train a model from scratch (diffusion U-Net or VAE)."""


@train.command("diffusion")
@click.option("--data", required=True, help="shapes[:RES], digits[:RES] or folder:PATH")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="model folder")
@click.option(
    "--cond", type=click.Choice(["none", "class", "text"]), default="none", show_default=True
)
@click.option("--preset", default="tiny", show_default=True, help="U-Net preset")
@click.option("--max-steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True, help="after warm-up: constant, or cosine decay to 0 at "
                                      "--max-steps (may change on --resume)")  # fmt: skip
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.999, show_default=True)
@click.option("--prediction", type=click.Choice(["eps", "v", "x0"]), default=None,
              help="what the network predicts [default: v with --vae, eps for pixels]")  # fmt: skip
@click.option(
    "--beta-schedule",
    type=click.Choice(["linear", "scaled_linear", "cosine"]),
    default="cosine",
    show_default=True,
)
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast for the forward pass")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-every", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--vae", type=click.Path(), default=None, help="VAE folder: latent diffusion")
@click.option("--cache-latents", is_flag=True, help="encode the dataset once (with --vae)")
@click.option("--cache-text", is_flag=True,
              help="encode every training caption once (--cond text; float16 table)")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="store the --cache-latents / --cache-text tables here and reuse them (resume, "
                   "other runs on the same data, VAE and text encoder)")  # fmt: skip
@click.option("--text-encoder", type=click.Choice(["minilm"]), default="minilm", show_default=True)
@click.option("--text-phrases", type=click.IntRange(min=0), default=0, show_default=True,
              help="phrase slots after the text tokens: the mean state of each phrase of the "
                   "prompt (an object with its colour, size and place), so cross-attention "
                   "sees each object bound in one key (0: tokens only)")  # fmt: skip
@click.option("--text-phrase-only", is_flag=True,
              help="with --text-phrases: condition on the phrase slots and the prompt's mean "
                   "state alone, without the token states")  # fmt: skip
@click.option("--task", type=click.Choice(["generate", "superres", "inpaint"]), default="generate",
              show_default=True, help="superres / inpaint: an image-conditioned model")  # fmt: skip
@click.option("--scale", type=click.Choice(["2", "4"]), default="4", show_default=True,
              callback=lambda ctx, param, v: int(v),
              help="--task superres: upscaling factor")  # fmt: skip
@click.option("--crop", type=click.IntRange(min=0), default=0, show_default=True,
              help="--task superres: train on random CROPxCROP crops (0: whole images); "
                   "the model still upscales whole images, tile by tile")  # fmt: skip
@click.option("--init-from", type=click.Path(), default=None,
              help="start from this diffusion model folder's weights (fine-tuning); a wider "
                   "conv_in (--task inpaint / superres) gets zero kernels for the new "
                   "channels")  # fmt: skip
@oversample_option
@click.option("--object-weight", metavar="WORDS=FACTOR", multiple=True,
              help="shapes data: weigh the loss on the pixels of such an object (its box, one "
                   "latent cell wider) FACTOR times, e.g. 'small star=4' (words as --oversample; "
                   "repeatable)")  # fmt: skip
@click.option("--region-captions", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              metavar="P",
              help="shapes data, --cond text: caption this share of the two-object images as "
                   "one of their objects alone (the prompt regional prompting gives its box) "
                   "and leave the other object's box out of the loss")  # fmt: skip
@click.option("--resume", is_flag=True, help="continue from the newest checkpoint in --out")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train_diffusion_cmd(resume: bool, **kw) -> int:
    """Train a diffusion U-Net, in pixel space or (with --vae) in a VAE's latent space."""
    from .training.loop import TrainConfig, train_diffusion

    if kw["prediction"] is None:
        # Latents have no fixed range to clip x0 estimates to, and an eps model's x0 estimate at
        # high noise is its eps error times sigma: v-prediction stays bounded there.
        kw["prediction"] = "v" if kw["vae"] else "eps"
    return train_diffusion(TrainConfig(**kw), resume=resume)


@train.command("vae")
@click.option("--data", required=True, help="shapes[:RES], digits[:RES] or folder:PATH")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="model folder")
@click.option("--preset", default="f4-tiny", show_default=True, help="VAE preset")
@click.option("--max-steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True, help="after warm-up: constant, or cosine decay to 0 at "
                                      "--max-steps (may change on --resume)")  # fmt: skip
@click.option("--kl-weight", type=click.FloatRange(min=0), default=1e-6, show_default=True)
@click.option("--loss", type=click.Choice(["l1", "l2"]), default="l1", show_default=True)
@click.option("--edge-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="extra weight of the reconstruction loss on and next to the target's edges "
                   "(pixels weigh 1 + this there; small shapes are mostly edge)")  # fmt: skip
@click.option(
    "--disc-start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="step at which the patch discriminator (hinge loss) starts; 0 = never",
)
@click.option("--disc-weight", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option("--crop", type=click.IntRange(min=0), default=0, show_default=True,
              help="train on random CROPxCROP crops (a multiple of the downsampling factor; "
                   "0: whole images); evaluation uses whole images")  # fmt: skip
@click.option(
    "--init-from",
    type=click.Path(),
    default=None,
    help="start from this VAE folder's weights (its architecture; --preset is ignored)",
)
@click.option("--decoder-only", is_flag=True,
              help="with --init-from: train the decoder alone; the encoder, the latent space "
                   "and the scaling factor stay the source's, so diffusion models trained on "
                   "its latents can use the new decoder")  # fmt: skip
@click.option("--bf16/--no-bf16", default=False)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sample-every", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=500, show_default=True)
@oversample_option
@click.option("--resume", is_flag=True, help="continue from the newest checkpoint in --out")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train_vae_cmd(resume: bool, **kw) -> int:
    """Train a KL autoencoder; its scaling factor and PSNR go into model.json."""
    from .training.vae_train import VAETrainConfig, train_vae

    return train_vae(VAETrainConfig(**kw), resume=resume)


# ----- sample / generate -----------------------------------------------------------------------
def _parse_options(ctx, param, values: tuple[str, ...]) -> dict | None:
    """--opt KEY=VALUE pairs -> {key: value}, values read as JSON where they parse (numbers,
    true/false), as strings otherwise (variant=bh1)."""
    import json

    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out or None


def _sampling_options(f):
    from .sampling import SAMPLERS
    from .schedules import SPACINGS

    f = click.option("--sampler", default=None, help=f"one of {', '.join(sorted(SAMPLERS))}")(f)
    f = click.option(
        "--steps", type=click.IntRange(min=1), default=None, help="denoising steps (model default)"
    )(f)
    f = click.option(
        "--spacing", default=None, help=f"noise-level spacing: one of {', '.join(SPACINGS)}"
    )(f)
    f = click.option(
        "--opt", "options", multiple=True, metavar="KEY=VALUE", callback=_parse_options,
        help="sampler knob, repeatable (e.g. --opt eta=0.5 --opt order=3; see docs/samplers.md)",
    )(f)  # fmt: skip
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--num", type=click.IntRange(min=1), default=1, show_default=True)(f)
    f = click.option("--bf16/--no-bf16", default=False, show_default=True,
                     help="bf16 autocast for the denoiser and decoder: about 1.5x faster on CPUs "
                     "with AVX512-BF16 or AMX, slow on others")(f)  # fmt: skip
    return f


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="model folder")
@click.option("--label", default=None, help="class index or name (class models)")
@click.option("--guidance", type=float, default=None, help="classifier-free guidance scale")
@guidance_interval_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="grid PNG")
@_sampling_options
def sample(model_dir, label, guidance, guidance_interval, out, sampler, steps, spacing, options,
           seed, num, bf16) -> None:  # fmt: skip
    """Sample a grid of images from a model folder."""
    from .io.images import save_grid
    from .io.model_folder import load_diffusion_model
    from .pipelines.generate import generate

    model = load_diffusion_model(model_dir)
    labels = None
    if label is not None:
        labels = [_parse_label(label, model.class_names, model.num_classes)]
    images = generate(
        model,
        labels=labels,
        num=num,
        seed=seed,
        sampler=sampler,
        steps=steps,
        spacing=spacing,
        guidance=guidance,
        guidance_interval=guidance_interval,
        bf16=bf16,
        **(options or {}),
    )
    save_grid(images, out, seed=seed, sampler=sampler or "", steps=steps or "")
    click.echo(f"wrote {num} image(s) to {out}")


def _parse_label(label: str, names: list[str], num_classes: int) -> int:
    if not num_classes:
        raise UserError("--label needs a class-conditional model; this one has no classes")
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < num_classes:
        return int(label)
    raise UserError(f"unknown label {label!r}; choose one of {names or list(range(num_classes))}")


@cli.command()
@click.argument("prompt", required=False)
@click.option("--model", "model_dir", default=None, type=click.Path(), help="model folder")
@click.option("--negative", default="", help="negative prompt (text models)")
@click.option("--guidance", type=float, default=None, help="classifier-free guidance scale")
@guidance_interval_option
@layout_option
@click.option("--region", "regions", multiple=True, type=(str, float, float, float, float),
              metavar="PROMPT X0 Y0 X1 Y1",
              help="draw PROMPT inside the box (fractions of the side, origin top left); "
              "repeat for more regions; replaces --layout")  # fmt: skip
@click.option("--out", default="out.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--preview", type=click.Path(dir_okay=False), default=None,
              help="GIF of the x0-estimate at every step")  # fmt: skip
@click.option("--from-png", type=click.Path(dir_okay=False), default=None,
              help="reproduce a PNG made by generate from its embedded parameters")  # fmt: skip
@_sampling_options
def generate(prompt, model_dir, negative, guidance, guidance_interval, layout, regions, out,
             preview, from_png, **opts) -> None:  # fmt: skip
    """Generate images for PROMPT, e.g. "a small red circle above a blue square"."""
    from .pipelines.generate import PARAM_KEYS, generate_to_png, params_from_png
    from .pipelines.layout import Region

    params = {
        "prompt": prompt, "negative": negative, "guidance": guidance,
        "guidance_interval": guidance_interval, "layout": layout,
        "regions": [Region(r[0], tuple(r[1:])) for r in regions] or None, **opts,
    }  # fmt: skip
    if from_png:
        params.update(params_from_png(from_png))
        model_dir = model_dir or params.pop("model_path", None)
    elif prompt is None:
        raise UserError("give a PROMPT (or --from-png FILE)")
    params = {k: v for k, v in params.items() if k in PARAM_KEYS}
    info = generate_to_png(model_dir, out, preview=preview, **params)
    click.echo(f"wrote {info['num']} image(s) ({info['conditioning']}) to {out}")


# ----- bench -----------------------------------------------------------------------------------
BENCHMARKS = {
    "generate": "latentforge.benchmarks.generate",
    "samplers": "latentforge.benchmarks.samplers",
    "latent-vs-pixel": "latentforge.benchmarks.latent_pixel",
    "unet": "latentforge.benchmarks.unet",
}


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)))
@click.pass_context
def bench(ctx: click.Context, name: str) -> int:
    """Run a benchmark (prints a table, or JSON with --json); `bench NAME --help` for options."""
    import importlib

    return importlib.import_module(BENCHMARKS[name]).main(list(ctx.args))


# ----- commands that live in their area's module (cheap imports; heavy ones happen inside) ------
from .commands.edit import img2img, inpaint, interpolate  # noqa: E402
from .commands.eval import eval_group  # noqa: E402
from .commands.sd import export, import_cmd  # noqa: E402
from .commands.serve import serve  # noqa: E402
from .commands.upscale import upscale  # noqa: E402

for _cmd in (img2img, inpaint, interpolate, upscale, eval_group, serve, import_cmd, export):
    cli.add_command(_cmd)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    try:
        rv = cli.main(args=argv, prog_name="latentforge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("latentforge: aborted", err=True)
        return 130
    except _NO_ARGS_IS_HELP as e:  # bare `latentforge` / `latentforge train`: show the help
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        return 0
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        click.echo(f"latentforge: error: {e.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"latentforge: error: {e.format_message()}", err=True)
        return 2
    except UserError as e:
        click.echo(f"latentforge: error: {e}", err=True)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
