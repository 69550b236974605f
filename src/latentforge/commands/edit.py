"""`latentforge img2img | inpaint | interpolate`: load files, call the pipelines, write files."""

from __future__ import annotations

from pathlib import Path

import click
import torch
import torch.nn.functional as F

from ..errors import UserError
from .common import parse_label, progress, resolved_steps, save_images
from .options import (
    control_options,
    control_request,
    device_options,
    embedding_options,
    guidance_interval_option,
    guidance_option,
    inpaint_options,
    layout_option,
    lora_option,
    model_option,
    negative_option,
    num_option,
    out_option,
    quiet_option,
    sampler_option,
    seed_option,
    size_options,
    spacing_option,
    stack,
    steps_option,
)

SPACING_HELP = "noise-level spacing (karras, trailing...)"

# --model, sampling and output options shared by img2img and inpaint
_edit_options = stack(
    model_option(),
    sampler_option(),
    steps_option(help="steps of the full schedule (model default)"),
    spacing_option(help=SPACING_HELP),
    guidance_option(help="classifier-free guidance"),
    negative_option,
    seed_option(),
    num_option,
    size_options,
    device_options,
    lora_option,
    embedding_options,
    control_options,
    out_option(),
    quiet_option,
)


def _load(path: str, shape: tuple[int, int, int], mode: str = "bicubic") -> torch.Tensor:
    """An image file -> (1, C, H, W) in [-1, 1], resized to the model's (C, H, W)."""
    from ..io.images import load_image

    image = load_image(path, shape[0])[None]
    if tuple(image.shape[-2:]) != shape[1:]:
        smooth = {"antialias": True} if mode == "bicubic" else {}
        image = F.interpolate(image, size=shape[1:], mode=mode, **smooth).clamp(-1, 1)
    return image


def _load_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A mask file (white = regenerate) -> (1, 1, H, W) in {0, 1}, resized nearest."""
    mask = (_load(path, (1, *size), mode="nearest") + 1) / 2
    return (mask > 0.5).float()


def _model_and_cond(model_dir, prompt: str, opts: dict):
    """The model (on --device, in --dtype, both taken out of `opts`, with the --lora files
    fused in: `opts["loras"]` becomes their NAME:SCALE labels), generate's conditioning for the
    prompt, its words, and the (C, H, W) the input image is resized to (--width / --height, the
    model's size where unset)."""
    from ..io.embeddings import load_embeddings
    from ..io.lora import load_model_with_loras
    from ..pipelines.common import describe_conditioning

    model, labels = load_model_with_loras(model_dir, opts["loras"], device=opts.pop("device"),
                                          dtype=opts.pop("dtype"))  # fmt: skip
    opts["loras"] = labels or None
    load_embeddings(model, opts.pop("embeddings"), opts.pop("embeddings_dir"))
    cond, what = describe_conditioning(model, prompt or "")
    c, h, w = model.output_shape
    return model, cond, what, (c, opts["height"] or h, opts["width"] or w)


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("prompt", required=False, default="")
@click.option("--strength", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="0 keeps the image, 1 ignores it (text-to-image)")  # fmt: skip
@guidance_interval_option
@layout_option
@_edit_options
def img2img(image, prompt, strength, model_dir, negative, out, quiet, **opts) -> None:
    """Redraw IMAGE towards PROMPT (SDEdit); a rough sketch works as IMAGE."""
    from ..pipelines.img2img import img2img as run

    control = control_request(opts)
    model, cond, what, shape = _model_and_cond(model_dir, prompt, opts)
    picture = _load(image, shape)
    controls, records = _controls(model, control)
    with progress(_tail_steps(model, opts["steps"], strength), "img2img", quiet) as callback:
        images = run(model, picture, strength=strength, negative=negative or None,
                     callback=callback, controls=controls, **cond, **opts)  # fmt: skip
    save_images(images, out, prompt=prompt, strength=strength, **_meta(opts), **records)
    click.echo(f"wrote {len(images)} image(s) ({what}, strength {strength}) to {out}")


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("mask", type=click.Path(dir_okay=False))
@click.argument("prompt", required=False, default="")
@inpaint_options
@click.option("--strength", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="below 1: start the masked region from the noised image")  # fmt: skip
@guidance_interval_option
@layout_option
@_edit_options
def inpaint(image, mask, prompt, model_dir, negative, out, quiet, **opts) -> None:
    """Regenerate the white part of MASK in IMAGE (training-free; kept pixels stay exact)."""
    from ..pipelines.inpaint import inpaint as run

    control = control_request(opts)
    model, cond, what, shape = _model_and_cond(model_dir, prompt, opts)
    picture = _load(image, shape)
    masks = _load_mask(mask, shape[1:])
    controls, records = _controls(model, control)
    # RePaint runs every step of the tail `resample` times, calling back each time
    total = _tail_steps(model, opts["steps"], opts["strength"]) * opts["resample"]
    with progress(total, "inpainting", quiet) as callback:
        images = run(model, picture, masks, negative=negative or None, callback=callback,
                     controls=controls, **cond, **opts)  # fmt: skip
    save_images(images, out, prompt=prompt, **_meta(opts), **records)
    click.echo(f"wrote {len(images)} image(s) ({what}) to {out}")


def _controls(model, control) -> tuple[list, dict]:
    """The ControlNets of a `control_request` and their PNG metadata ({} for none)."""
    import json

    if control is None:
        return [], {}
    controls, records = control.build(model)
    return controls, {"controlnets": json.dumps(records)}


def _meta(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if v is not None}


def _tail_steps(model, steps: int | None, strength: float) -> int:
    """The steps img2img and inpaint run at `strength`: the tail of the schedule they sample,
    measured by the pipelines' own rule (round(strength * steps))."""
    from ..pipelines.common import schedule_tail

    return len(schedule_tail(model, resolved_steps(model, steps), strength)) - 1


def _label_or_prompt(model, label: str | None, prompt: str | None) -> tuple[int | None, str]:
    """(class label, prompt) for one end of an interpolation."""
    from ..pipelines.common import labels_from_prompt

    if label is not None:
        return parse_label(label, model.class_names, model.num_classes), ""
    if prompt and model.num_classes:
        return labels_from_prompt(prompt, model.class_names), ""
    return None, prompt or ""


@click.command()
@click.argument("images", nargs=-1, metavar="[A B]", type=click.Path(dir_okay=False))
@click.option("--seeds", type=(int, int), default=None,
              help="walk between the prior noises of two seeds instead of two images")  # fmt: skip
@click.option("--label-a", default=None, help="class (index or name) of A")
@click.option("--label-b", default=None, help="class (index or name) of B")
@click.option("--prompt-a", default=None, help="prompt for A (class models: names the class)")
@click.option("--prompt-b", default=None, help="prompt for B")
@click.option("--frames", type=click.IntRange(min=2), default=8, show_default=True)
@model_option(help="model folder")
@steps_option(help="DDIM steps")
@spacing_option(help=SPACING_HELP)
@guidance_option(help="classifier-free guidance (default 1 for images, model default for seeds)")
@guidance_interval_option
@click.option("--ms-per-frame", type=click.IntRange(min=10), default=120, show_default=True)
@device_options
@lora_option
@embedding_options
@out_option(default="walk.gif", help=".gif: an animation; otherwise a PNG strip")
@quiet_option
def interpolate(images, seeds, label_a, label_b, prompt_a, prompt_b, frames, model_dir, steps,
                spacing, guidance, guidance_interval, ms_per_frame, device, dtype, loras,
                embeddings, embeddings_dir, out, quiet) -> None:  # fmt: skip
    """Morph image A into image B (DDIM inversion + slerp), or walk between two --seeds."""
    from ..io.embeddings import load_embeddings
    from ..io.images import save_gif, save_grid
    from ..io.lora import load_model_with_loras
    from ..pipelines import interpolate as pipe

    if bool(images) == bool(seeds) or len(images) not in (0, 2):
        raise UserError("give two images A B, or --seeds A B (not both)")
    model, _ = load_model_with_loras(model_dir, loras, device=device, dtype=dtype)
    load_embeddings(model, embeddings, embeddings_dir)
    la, pa = _label_or_prompt(model, label_a, prompt_a)
    lb, pb = _label_or_prompt(model, label_b, prompt_b)
    kw = {"frames": frames, "labels_a": la, "labels_b": lb, "prompts_a": pa, "prompts_b": pb,
          "steps": steps, "spacing": spacing, "guidance_interval": guidance_interval}  # fmt: skip
    if not seeds:
        a, b = (_load(p, model.output_shape) for p in images)
    # between images: two inversions (steps - 1 intervals each) and the frames' run (steps)
    n = resolved_steps(model, steps)
    total = n if seeds else 3 * n - 2
    with progress(total, "interpolating", quiet) as callback:
        if seeds:
            result = pipe.walk(model, *seeds, guidance=guidance, callback=callback, **kw)
        else:
            result = pipe.interpolate(model, a, b, guidance=1.0 if guidance is None else guidance,
                                      callback=callback, **kw)  # fmt: skip
    if Path(out).suffix.lower() == ".gif":
        save_gif([frame[None] for frame in result], out, ms_per_frame=ms_per_frame)
    else:
        save_grid(result, out, nrow=len(result))
    click.echo(f"wrote {len(result)} frames to {out}")
