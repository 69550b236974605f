"""The options several commands share, defined once so that their names, types and defaults
cannot drift apart between generate, sample, img2img, inpaint, interpolate, upscale and eval.

Options that read the same everywhere are plain decorators (`@num_option`); those whose help
text differs by command (what the default model is, what the steps count) are factories taking
that text (`@model_option(help=...)`), so each command keeps its own wording. `stack` applies
several in help order. Choices that need the library (sampler names, spacings, layouts) are
read when a command is defined, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]

EMBEDDED_MODEL = "model folder (default: the embedded model)"


def stack(*decorators: Decorator) -> Decorator:
    """One decorator applying `decorators` as if written one above the other (so --help lists
    their options in this order)."""

    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


# ----- options with one wording everywhere -------------------------------------------------------
def guidance_interval_option(f: F) -> F:
    """--guidance-interval LO HI, shared by the commands that sample with guidance."""
    return click.option(
        "--guidance-interval", nargs=2, type=float, default=None, metavar="LO HI",
        help="guide only at noise levels LO < sigma <= HI, one network call elsewhere "
        "(model default; '0 inf': every step)",
    )(f)  # fmt: skip


def layout_option(f: F) -> F:
    """--layout NAME, shared by the commands that generate from prompts: the registered layout
    planners (pipelines/layout.py; the shapes wing adds "shapes")."""
    from ..pipelines.layout import layout_names

    return click.option(
        "--layout", type=click.Choice(layout_names()), default=None,
        help="regional prompting: 'shapes' reads one region per object from the prompt and "
        "denoises each box under its own one-object prompt (model default; see "
        "docs/text-to-image.md)",
    )(f)  # fmt: skip


def negative_option(f: F) -> F:
    """--negative PROMPT (generate and the editing commands)."""
    return click.option("--negative", default="", help="negative prompt (text models)")(f)


def num_option(f: F) -> F:
    """--num N: images per call."""
    return click.option("--num", type=click.IntRange(min=1), default=1, show_default=True)(f)


def _parse_options(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict | None:
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


def lora_option(f: F) -> F:
    """--lora FILE[:SCALE] (repeatable) -> `loras`, a tuple of specs (io/lora.py reads them)."""
    return click.option(
        "--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
        help="apply a LoRA (kohya/A1111 or diffusers .safetensors) at SCALE (default 1); "
        "repeatable (see docs/lora.md)",
    )(f)  # fmt: skip


def embedding_options(f: F) -> F:
    """--embedding FILE[:TOKEN] (repeatable) -> `embeddings`, --embeddings-dir DIR ->
    `embeddings_dir`: textual-inversion embeddings (io/embeddings.py reads them)."""
    f = click.option(
        "--embeddings-dir", type=click.Path(file_okay=False), default=None,
        help="load every .safetensors embedding in DIR (default: the model's embeddings/ "
        "folder, if any)",
    )(f)  # fmt: skip
    return click.option(
        "--embedding", "embeddings", multiple=True, metavar="FILE[:TOKEN]",
        help="a textual-inversion embedding (A1111 or diffusers .safetensors), used in prompts "
        "by its trigger word (the file name, or TOKEN); repeatable (see docs/prompts.md)",
    )(f)  # fmt: skip


def control_options(f: F) -> F:
    """--controlnet DIR / --control IMAGE (repeatable, paired in order) and their knobs ->
    `controlnets`, `controls`, `control_scales`, `control_starts`, `control_ends`,
    `control_preprocess`, `guess_mode` (`control_request` turns them into a request)."""
    one_or_each = "; one value for all ControlNets or one per ControlNet"
    for name, dest, default, what in (
        ("--control-end", "control_ends", "1", "fraction of the steps after which it stops"),
        ("--control-start", "control_starts", "0", "fraction of the steps before it starts"),
        ("--control-scale", "control_scales", "1", "ControlNet strength"),
    ):
        f = click.option(name, dest, type=float, multiple=True,
                         help=f"{what} (default {default}){one_or_each}")(f)  # fmt: skip
    f = click.option(
        "--guess-mode", is_flag=True,
        help="the ControlNets act on the conditional half of guidance only (diffusers' guess "
        "mode: follow the control image with an empty prompt)",
    )(f)  # fmt: skip
    f = click.option(
        "--control-preprocess", "control_preprocess", multiple=True,
        type=click.Choice(["canny", "scribble", "sketch", "none"]),
        help="turn the control image into the ControlNet's input (default: the preprocessor "
        f"the ControlNet was trained with; none: use it as it is){one_or_each}",
    )(f)  # fmt: skip
    f = click.option(
        "--control", "controls", multiple=True, type=click.Path(dir_okay=False),
        metavar="IMAGE",
        help="control image (any size: resized to the output), repeatable; pairs with the "
        "--controlnet of the same position (none: the model's default ControlNet)",
    )(f)  # fmt: skip
    return click.option(
        "--controlnet", "controlnets", multiple=True, type=click.Path(file_okay=False),
        metavar="DIR", help="a ControlNet folder (see docs/editing.md), repeatable",
    )(f)  # fmt: skip


def control_request(opts: dict) -> Any:
    """Take the `control_options` values out of `opts`: a `ControlRequest`, or None when no
    --control / --controlnet was given."""
    from ..pipelines.control import ControlRequest, open_control_image

    images, folders = opts.pop("controls"), opts.pop("controlnets")
    knobs = {k: tuple(opts.pop(f"control_{k}")) for k in ("scales", "starts", "ends")}
    preprocess, guess = tuple(opts.pop("control_preprocess")), opts.pop("guess_mode")
    if not images and not folders:
        return None
    pictures = tuple(open_control_image(p, f"--control {p}") for p in images)
    return ControlRequest(pictures, tuple(folders), preprocess=preprocess,
                          guess_mode=(True,) if guess else (), **knobs)  # fmt: skip


def sampler_knobs_option(f: F) -> F:
    """--opt KEY=VALUE (repeatable) -> `options`, a dict of sampler knobs or None."""
    return click.option(
        "--opt", "options", multiple=True, metavar="KEY=VALUE", callback=_parse_options,
        help="sampler knob, repeatable (e.g. --opt eta=0.5 --opt order=3; see docs/samplers.md)",
    )(f)  # fmt: skip


def inpaint_options(f: F) -> F:
    """The RePaint and seam options shared by `inpaint` and `eval inpaint`."""
    f = click.option("--feather", type=click.IntRange(min=0), default=0, show_default=True,
                     help="soften the seam over this many pixels inside the mask")(f)  # fmt: skip
    f = click.option("--jump", type=click.IntRange(min=1), default=1, show_default=True,
                     help="RePaint: steps per stretch before jumping back up")(f)  # fmt: skip
    return click.option("--resample", type=click.IntRange(min=1), default=1, show_default=True,
                        help="RePaint: run each stretch of steps N times")(f)  # fmt: skip


def json_option(f: F) -> F:
    """--json -> `as_json`: the evaluators' machine-readable output."""
    return click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")(f)


def size_options(f: F) -> F:
    """--width / --height: the output size in pixels (multiples of the model's grid), and
    --vae-tiling, how the decoder bounds its memory at that size."""
    f = click.option(
        "--vae-tiling", type=click.Choice(["auto", "on", "off"]), default="auto",
        show_default=True,
        help="decode in tiles: auto above 4x the model's trained area, on always (least "
        "memory), off never",
    )(f)  # fmt: skip
    for side in ("height", "width"):
        f = click.option(
            f"--{side}", type=click.IntRange(min=1), default=None,
            help=f"output {side} in pixels, a multiple of the model's grid (model default)",
        )(f)  # fmt: skip
    return f


def sdxl_options(f: F) -> F:
    """SDXL's micro-conditioning (SampleSettings fields; other models refuse them): the sizes
    and crop the base is told about, and the refiner's aesthetic scores."""
    pairs = (
        ("original-size", "H W", "the image size (height, width) the model is told of"),
        ("crops-coords-top-left", "TOP LEFT", "the crop's top-left corner it is told of"),
        ("target-size", "H W", "the size (height, width) it is told to aim for"),
    )
    for name, metavar, what in reversed(pairs):
        f = click.option(
            f"--negative-{name}", type=(int, int), default=None, metavar=metavar,
            help=f"SDXL, the guidance's negative half: {what}",
        )(f)  # fmt: skip
        f = click.option(
            f"--{name}", type=(int, int), default=None, metavar=metavar,
            help=f"SDXL: {what} (default: the output size; crop 0 0)",
        )(f)  # fmt: skip
    for name, default in (("negative-aesthetic-score", 2.5), ("aesthetic-score", 6.0)):
        f = click.option(
            f"--{name}", type=float, default=None,
            help=f"SDXL refiner: the {name.replace('-', ' ')} conditioned on (default {default})",
        )(f)  # fmt: skip
    return f


def device_options(f: F) -> F:
    """--device / --dtype: where the model runs and its weights' precision."""
    f = click.option(
        "--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
        show_default=True,
        help="weights and compute precision (fp16: GPUs only; the VAE then decodes in fp32)",
    )(f)  # fmt: skip
    return click.option(
        "--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N|mps",
        help="where to run: auto = CUDA if available, else MPS, else CPU (or "
        "$LATENTFORGE_DEVICE)",
    )(f)  # fmt: skip


def quiet_option(f: F) -> F:
    """--quiet: no progress bar (training, evaluation, and every command that samples)."""
    return click.option("--quiet", is_flag=True, help="no progress bar")(f)


# ----- options whose help text is the command's own ----------------------------------------------
def model_option(help: str = EMBEDDED_MODEL, *, required: bool = False) -> Decorator:
    """--model PATH -> `model_dir`; `help` says what kind of folder and what the default is."""
    return click.option(
        "--model", "model_dir", required=required, default=None, type=click.Path(), help=help
    )


def sampler_option(help: str | None = None) -> Decorator:
    """--sampler NAME; help lists the samplers unless given."""
    if help is None:
        from ..sampling import SAMPLERS

        help = f"one of {', '.join(sorted(SAMPLERS))}"
    return click.option("--sampler", default=None, help=help)


def steps_option(
    help: str | None = "denoising steps (model default)", default: int | None = None
) -> Decorator:
    """--steps N; a fixed default (the evaluators') is shown in --help."""
    return click.option(
        "--steps", type=click.IntRange(min=1), default=default, show_default=default is not None,
        help=help,
    )  # fmt: skip


def spacing_option(help: str | None = None) -> Decorator:
    """--spacing NAME; help lists the spacings unless given."""
    if help is None:
        from ..schedules import SPACINGS

        help = f"noise-level spacing: one of {', '.join(SPACINGS)}"
    return click.option("--spacing", default=None, help=help)


def guidance_option(help: str = "classifier-free guidance scale") -> Decorator:
    """--guidance SCALE (None: the model's default)."""
    return click.option("--guidance", type=float, default=None, help=help)


def seed_option(help: str | None = None) -> Decorator:
    """--seed N, 0 by default."""
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def bf16_option(
    help: str = "bf16 autocast for the denoiser and decoder: about 1.5x faster on CPUs with "
    "AVX512-BF16 or AMX, slow on others",
) -> Decorator:
    """--bf16/--no-bf16 for sampling (off by default)."""
    return click.option("--bf16/--no-bf16", default=False, show_default=True, help=help)


def out_option(default: str = "out.png", help: str | None = None) -> Decorator:
    """--out FILE, a default file name shown in --help."""
    return click.option(
        "--out", default=default, show_default=True, type=click.Path(dir_okay=False), help=help
    )


def batch_option(help: str | None = None) -> Decorator:
    """--batch N: images per batch in the evaluators, 64 by default."""
    return click.option(
        "--batch", type=click.IntRange(min=1), default=64, show_default=True, help=help
    )


def sampling_options(f: F) -> F:
    """The sampling options of `generate` and `sample` (in their --help order)."""
    return stack(
        bf16_option(), num_option, seed_option(), sampler_knobs_option, spacing_option(),
        steps_option(), sampler_option(),
    )(f)  # fmt: skip
