"""`latentforge eval prompts|digits|superres|fid|vae|inversion|inpaint|control`: score a model
with the project's evaluators."""

from __future__ import annotations

import json
import math

import click

from ..errors import UserError
from .options import (
    batch_option,
    bf16_option,
    device_options,
    guidance_interval_option,
    guidance_option,
    inpaint_options,
    json_option,
    layout_option,
    lora_option,
    model_option,
    quiet_option,
    sampler_option,
    seed_option,
    spacing_option,
    stack,
    steps_option,
)

SAMPLER_HELP = "sampler name (model default)"

# the options of the evaluators that sample from a diffusion model
_common_options = stack(
    model_option(),
    sampler_option(help=SAMPLER_HELP),
    guidance_option(help="classifier-free guidance scale (model default)"),
    seed_option(
        help="seed of the first image; the j-th image generated uses SEED + j, so runs whose "
        "seeds differ by the image count or more draw disjoint noise"
    ),
    batch_option(help="images per sampling batch"),
    device_options,
    json_option,
    quiet_option,
)


def _number(x: float) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.3f}"


def _settings_line(what: str, settings: dict) -> str:
    return (
        f"{what} (sampler {settings['sampler']}, {settings['steps']} steps, "
        f"guidance {settings['guidance']:g}{_interval_words(settings)}, seed {settings['seed']}"
        f"{_layout_words(settings)}{', bf16' if settings.get('bf16') else ''}"
        f"{''.join(f', LoRA {label}' for label in settings.get('loras') or ())})"
    )


def _layout_words(settings: dict) -> str:
    layout = settings.get("layout")
    return f", layout {layout}" if layout and layout != "none" else ""


def _interval_words(settings: dict) -> str:
    """' at LO < sigma <= HI' for a limited guidance interval, '' when guided every step."""
    interval = settings.get("guidance_interval")
    if not interval or interval == [0.0, None]:
        return ""
    return f" at {interval[0]:g} < sigma <= {'inf' if interval[1] is None else f'{interval[1]:g}'}"


@click.group("eval")
def eval_group() -> None:
    """Score a model: prompt following on shapes, class accuracy on digits, upscaling
    against bicubic."""


@eval_group.command("prompts")
@click.option(
    "--prompts",
    "prompt_file",
    required=True,
    help="prompt file (one a line) or a packaged set: shapes-seen, shapes-heldout",
)
@click.option("--per-prompt", type=click.IntRange(min=1), default=4, show_default=True)
@steps_option(help=None, default=20)
@guidance_interval_option
@layout_option
@bf16_option(help="sample under bf16 autocast, as generate --bf16")
@lora_option
@_common_options
def prompts_cmd(prompt_file, per_prompt, steps, guidance_interval, layout, bf16, loras,
                model_dir, sampler, guidance, seed, batch, device, dtype, as_json,
                quiet) -> None:  # fmt: skip
    """Generate for every prompt and check colour, shape, size, position, relation and
    background of what was drawn (shapes models); with --lora, of the model with the LoRAs
    fused in."""
    from ..io.lora import load_model_with_loras
    from ..shapes.evaluate import evaluate_prompts, load_prompts

    prompts = load_prompts(prompt_file)
    model, labels = load_model_with_loras(model_dir, loras, device=device, dtype=dtype)
    result = evaluate_prompts(
        model, prompts, per_prompt=per_prompt, seed=seed, sampler=sampler, steps=steps,
        guidance=guidance, guidance_interval=guidance_interval, layout=layout, batch=batch,
        progress=not quiet, bf16=bf16,
    )  # fmt: skip
    result["settings"]["loras"] = labels
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    what = f"{result['n_prompts']} prompts x {per_prompt} images"
    lines = [_settings_line(what, result["settings"]), ""]
    lines.append(f"{'prompt accuracy':<22}{_number(result['prompt_accuracy'])}")
    for split, acc in result["prompt_accuracy_by_split"].items():
        lines.append(f"  {split + ' prompts':<20}{_number(acc)}")
    for k, acc in result["prompt_accuracy_by_objects"].items():
        lines.append(f"  {k + (' object' if k == '1' else ' objects'):<20}{_number(acc)}")
    lines.append("attribute accuracy")
    for attr, acc in result["attribute_accuracy"].items():
        lines.append(f"  {attr:<20}{_number(acc)}")
    lines.append(f"{'images/s':<22}{result['images_per_s']:.2f}")
    worst = sorted(result["per_prompt"], key=lambda r: r["accuracy"])[:5]
    if worst and worst[0]["accuracy"] < 1:
        lines += ["", "worst prompts"]
        lines += [f"  {r['accuracy']:.2f}  {r['prompt']}" for r in worst if r["accuracy"] < 1]
    click.echo("\n".join(lines))


@eval_group.command("digits")
@click.option("--per-class", type=click.IntRange(min=1), default=50, show_default=True)
@steps_option(help=None, default=50)
@_common_options
def digits_cmd(per_class, steps, model_dir, sampler, guidance, seed, batch, device, dtype,
               as_json, quiet) -> None:  # fmt: skip
    """Generate every digit and score it with the project's digits classifier."""
    from ..io.model_folder import load_diffusion_model
    from ..metrics.digits_eval import evaluate_digits

    model = load_diffusion_model(model_dir, device=device, dtype=dtype)
    result = evaluate_digits(
        model, per_class=per_class, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
        batch=batch, progress=not quiet,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    what = f"10 digits x {per_class} images"
    lines = [_settings_line(what, result["settings"]), ""]
    lines.append(f"{'class accuracy':<22}{_number(result['class_accuracy'])}")
    lines.append("  " + "  ".join(f"{d}:{acc:.2f}" for d, acc in result["per_class"].items()))
    lines.append(f"{'classifier accuracy':<22}{_number(result['classifier_accuracy'])} (held out)")
    lines.append(f"{'images/s':<22}{result['images_per_s']:.2f}")
    click.echo("\n".join(lines))


@eval_group.command("superres")
@click.option("--n", "n", type=click.IntRange(min=1), default=256, show_default=True,
              help="held-out images")  # fmt: skip
@click.option("--data", default=None, help="data spec (default: the model's training data)")
@click.option("--data-seed", type=int, default=1, show_default=True,
              help="stream of held-out images (models train on stream 0)")  # fmt: skip
@steps_option(help="steps (model default)")
@click.option("--noise-level", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="noise added to the low-res input")  # fmt: skip
@sampler_option(help=SAMPLER_HELP)
@model_option(help="upscaler folder (default: the embedded upscaler)")
@seed_option()
@batch_option()
@json_option
@quiet_option
def superres_cmd(n, data, data_seed, steps, noise_level, sampler, model_dir, seed, batch,
                 as_json, quiet) -> None:  # fmt: skip
    """Upscale held-out images downsampled by the model's scale; PSNR and SSIM against the
    originals, beside bicubic's."""
    from ..io.model_folder import load_diffusion_model
    from ..metrics.superres_eval import evaluate_superres
    from ..pipelines.superres import require_default_upscaler

    model = load_diffusion_model(model_dir or require_default_upscaler())
    result = evaluate_superres(
        model, n=n, data=data, data_seed=data_seed, seed=seed, sampler=sampler, steps=steps,
        noise_level=noise_level, batch=batch, progress=not quiet,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    st = result["settings"]
    lines = [
        f"x{result['scale']} on {n} held-out images of {result['data']} (stream "
        f"{result['data_seed']}); sampler {st['sampler']}, {st['steps']} steps, noise level "
        f"{st['noise_level']:g}, seed {st['seed']}",
        "",
        f"{'':<10}{'PSNR dB':>9}{'SSIM':>8}",
        f"{'model':<10}{result['psnr_db']:>9.2f}{result['ssim']:>8.4f}",
        f"{'bicubic':<10}{result['psnr_bicubic_db']:>9.2f}{result['ssim_bicubic']:>8.4f}",
        f"gain {result['psnr_gain_db']:+.2f} dB; model better on {result['wins']:.1%} of images",
        f"{'images/s':<10}{result['images_per_s']:>9.2f}",
    ]
    click.echo("\n".join(lines))


@eval_group.command("fid")
@click.option("--ref", default=None,
              help="reference set: a data spec (shapes:64, digits, folder:PATH) or a folder "
              "(default: the model's training data, held-out stream)")  # fmt: skip
@click.option("--gen", default=None, help="generated set: a data spec or folder (or --model)")
@click.option("--features", default="pixels", show_default=True,
              help="feature network: pixels, shapes (the shapes / digits encoder that ships), "
              "or inception:FILE (FID's Inception-v3 weights of pytorch-fid or torch-fidelity, "
              "a local file)")  # fmt: skip
@click.option("--resize", type=click.Choice(["clean", "tf", "torch"]), default="clean",
              show_default=True,
              help="inception: resize to 299 as clean-fid (PIL bicubic), TF / torch-fidelity "
              "(tf) or pytorch-fid (torch)")  # fmt: skip
@click.option("--n", "n", type=click.IntRange(min=2), default=1000, show_default=True,
              help="images per set")  # fmt: skip
@click.option("--data-seed", type=int, default=1, show_default=True,
              help="stream of the reference data (models train on stream 0)")  # fmt: skip
@steps_option(help="steps (model default)")
@spacing_option()
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="reference features cache (default: $LATENTFORGE_CACHE or "
              "~/.cache/latentforge)")  # fmt: skip
@click.option("--no-cache", is_flag=True, help="recompute the reference features")
@_common_options
def fid_cmd(ref, gen, features, resize, n, data_seed, steps, spacing, cache_dir, no_cache,
            model_dir, sampler, guidance, seed, batch, device, dtype, as_json,
            quiet) -> None:  # fmt: skip
    """FID, KID, precision / recall and density / coverage of a model's samples (or --gen)
    against a reference set."""
    from pathlib import Path

    from ..io.checkpoint import default_cache_dir
    from ..io.model_folder import load_diffusion_model
    from ..metrics.fid_eval import evaluate_fid
    from ..pipelines.settings import SampleSettings

    model = None
    if gen is None:
        model = load_diffusion_model(model_dir, device=device, dtype=dtype)
    elif model_dir is not None:
        raise UserError("give --gen or --model, not both")
    settings = SampleSettings.build(sampler=sampler, steps=steps, spacing=spacing,
                                    guidance=guidance, seed=seed)  # fmt: skip
    cache = None if no_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    result = evaluate_fid(
        ref=ref, gen=gen, model=model, settings=settings, features=features, resize=resize, n=n,
        data_seed=data_seed, batch=batch, progress=not quiet, cache_dir=cache,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    lines = [f"{result['gen']} against {result['ref']} (stream {data_seed}), {n} images each, "
             f"features {features}"]  # fmt: skip
    if "settings" in result:
        st = result["settings"]
        lines[0] += f"; sampler {st['sampler']}, {st['steps']} steps, guidance {st['guidance']:g}"
    lines += [
        f"{'FID':<12}{result['fid']:.4f}",
        f"{'KID':<12}{result['kid']:.5f} +- {result['kid_std']:.5f}",
        f"{'precision':<12}{result['precision']:.4f}",
        f"{'recall':<12}{result['recall']:.4f}",
        f"{'density':<12}{result['density']:.4f}",
        f"{'coverage':<12}{result['coverage']:.4f}",
    ]
    if "images_per_s" in result:
        lines.append(f"{'images/s':<12}{result['images_per_s']:.2f}")
    click.echo("\n".join(lines))


@eval_group.command("vae")
@model_option(help="VAE folder, or a latent diffusion model folder (its vae/)", required=True)
@click.option("--n", "n", type=click.IntRange(min=1), default=256, show_default=True,
              help="held-out images")  # fmt: skip
@click.option("--data", default=None, help="data spec (default: the VAE's training data)")
@click.option("--data-seed", type=int, default=1, show_default=True,
              help="stream of held-out images (the trainer uses stream 0)")  # fmt: skip
@batch_option()
@json_option
@quiet_option
def vae_cmd(model_dir, n, data, data_seed, batch, as_json, quiet) -> None:
    """Encode and decode held-out images; PSNR and SSIM of the reconstructions."""
    from pathlib import Path

    from ..io.model_folder import load_vae, read_model_meta
    from ..metrics.vae_eval import evaluate_vae

    folder = Path(model_dir)
    meta = read_model_meta(folder)
    if meta.kind == "diffusion" and meta.latent is not None:
        folder = folder / meta.latent.vae
    vae, meta = load_vae(folder)
    result = evaluate_vae(vae, meta, n=n, data=data, data_seed=data_seed, batch=batch,
                          progress=not quiet)  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"f={result['downsample_factor']} VAE, {n} held-out images of {result['data']} "
        f"(stream {result['data_seed']})\n"
        f"PSNR {result['psnr_db']:.2f} dB (worst {result['psnr_min_db']:.2f}), "
        f"SSIM {result['ssim']:.4f}, scaled latent rms {result['scaled_latent_rms']:.3f}, "
        f"{result['images_per_s']:.1f} images/s"
    )
    if "roundtrip_scene_accuracy" in result:
        kinds = result["roundtrip_scene_accuracy_by_object"]
        click.echo(
            f"scenes the analyser reads back whole: {result['roundtrip_scene_accuracy']:.1%} "
            "(the ceiling of a latent model with this VAE); by object: "
            + ", ".join(f"{k} {v:.0%}" for k, v in kinds.items())
        )


@eval_group.command("inversion")
@click.option("--n", "n", type=click.IntRange(min=1), default=64, show_default=True)
@steps_option(help=None, default=50)
@click.option("--data", default=None, help="data spec (default: the model's training data)")
@click.option("--data-seed", type=int, default=1, show_default=True,
              help="shapes stream of the images (models train on stream 0)")  # fmt: skip
@spacing_option(help="step spacing (model default)")
@model_option()
@batch_option()
@json_option
@quiet_option
def inversion_cmd(n, steps, data, data_seed, spacing, model_dir, batch, as_json, quiet) -> None:
    """DDIM-invert dataset images to noise and decode them back; PSNR / SSIM of the round
    trip."""
    from ..io.model_folder import load_diffusion_model
    from ..metrics.inversion_eval import evaluate_inversion

    model = load_diffusion_model(model_dir)
    result = evaluate_inversion(
        model, n=n, steps=steps, data=data, data_seed=data_seed, spacing=spacing, batch=batch,
        progress=not quiet,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"DDIM inversion round trip, {result['n']} images of {result['data']}, "
        f"{result['steps']} steps, conditioning {', '.join(result['conditioning'])}\n"
        f"PSNR {result['psnr_db']:.2f} dB (worst {result['psnr_min_db']:.2f}), "
        f"SSIM {result['ssim']:.4f}, {result['images_per_s']:.2f} images/s"
    )


@eval_group.command("inpaint")
@click.option("--n", "n", type=click.IntRange(min=1), default=256, show_default=True,
              help="held-out scenes")  # fmt: skip
@click.option(
    "--mode",
    type=click.Choice(["replace", "restore"]),
    default="replace",
    show_default=True,
    help="replace: prompt a new colour and shape in the hole; restore: the old object",
)
@click.option("--data", default=None, help="shapes data spec (default: the model's training data)")
@click.option("--data-seed", type=int, default=1, show_default=True,
              help="stream of held-out scenes (models train on stream 0)")  # fmt: skip
@steps_option(help="steps (model default)")
@inpaint_options
@guidance_interval_option
@layout_option
@click.option(
    "--dilate",
    type=click.IntRange(min=0),
    default=None,
    help="pixels the hole reaches beyond the object's box (default: resolution / 32)",
)
@_common_options
def inpaint_cmd(n, mode, data, data_seed, steps, resample, jump, feather, guidance_interval,
                layout, dilate, model_dir, sampler, guidance, seed, batch, device, dtype,
                as_json, quiet) -> None:  # fmt: skip
    """Mask one object in held-out shapes scenes, inpaint the hole from a prompt and check
    that the prompted object is there (the issue 6 benchmark)."""
    from ..io.model_folder import load_diffusion_model
    from ..shapes.inpaint_eval import evaluate_inpaint

    model = load_diffusion_model(model_dir, device=device, dtype=dtype)
    result = evaluate_inpaint(
        model, n=n, mode=mode, data=data, data_seed=data_seed, seed=seed, sampler=sampler,
        steps=steps, guidance=guidance, guidance_interval=guidance_interval, layout=layout,
        resample=resample, jump=jump, feather=feather, dilate=dilate, batch=batch,
        progress=not quiet,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    st, gt = result["settings"], result["ground_truth"]
    what = (
        f"inpaint ({result['mode']}, {result['method']}) on {n} held-out scenes of "
        f"{result['data']} (stream {result['data_seed']})"
    )
    lines = [
        f"{what}; sampler {st['sampler']}, {st['steps']} steps, guidance {st['guidance']:g}"
        f"{_interval_words(st)}{_layout_words(st)}, resample {st['resample']}, jump {st['jump']}, "
        f"seed {st['seed']}",
        "",
        f"{'hole accuracy':<24}{_number(result['hole_accuracy'])}"
        f"   (ground truth {_number(gt['hole_accuracy'])})",
        f"{'prompt accuracy':<24}{_number(result['prompt_accuracy'])}"
        f"   (ground truth {_number(gt['prompt_accuracy'])})",
        "attribute accuracy",
        *(f"  {a:<22}{_number(acc)}" for a, acc in result["attribute_accuracy"].items()),
        f"{'unmasked max abs diff':<24}{result['unmasked_max_abs_diff']:g}",
        f"{'masked area':<24}{result['mask_fraction']:.1%} (dilate {st['dilate']} px)",
        f"{'images/s':<24}{result['images_per_s']:.2f}",
    ]
    if result["skipped"]:
        lines.append(f"{'skipped scenes':<24}{result['skipped']} (objects too close)")
    click.echo("\n".join(lines))


@eval_group.command("control")
@click.option("--controlnet", type=click.Path(file_okay=False), default=None,
              help="ControlNet folder (default: the model's own, sampling.controlnet)")  # fmt: skip
@click.option("--n", "n", type=click.IntRange(min=1), default=64, show_default=True,
              help="held-out scenes")  # fmt: skip
@click.option("--data", default=None, help="shapes data spec (default: the model's training data)")
@click.option("--data-seed", type=int, default=1, show_default=True,
              help="stream of held-out scenes (models train on stream 0)")  # fmt: skip
@click.option("--control-scale", type=float, default=1.0, show_default=True,
              help="multiplies the ControlNet's residuals")  # fmt: skip
@click.option("--figure", type=click.Path(dir_okay=False), default=None,
              help="PNG of the first 8 scenes: sketch, image, baseline, wrong sketch")  # fmt: skip
@steps_option(help="steps (model default)")
@_common_options
def control_cmd(controlnet, n, data, data_seed, control_scale, figure, steps, model_dir, sampler,
                guidance, seed, batch, device, dtype, as_json, quiet) -> None:  # fmt: skip
    """Sketch to image: draw held-out shapes scenes as sketches, generate from sketch + caption
    and check that shape, position and size follow the sketch and colours the prompt, against
    the prompt alone and a sketch of another shape (issue 25)."""
    from ..io.model_folder import load_diffusion_model
    from ..shapes.control_eval import evaluate_control

    model = load_diffusion_model(model_dir, device=device, dtype=dtype)
    result = evaluate_control(
        model, controlnet, n=n, data=data, data_seed=data_seed, scale=control_scale,
        figure=figure, seed=seed, sampler=sampler, steps=steps, guidance=guidance,
        batch=batch, progress=not quiet,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    c, b, w = result["control"], result["baseline"], result["wrong_sketch"]
    click.echo(
        f"sketch to image, {n} held-out scenes: shape {c['shape']:.1%}, position "
        f"{c['position']:.1%}, size {c['size']:.1%}, colour {c['colour']:.1%} "
        f"(prompt alone: {b['shape']:.1%}, {b['position']:.1%}, {b['size']:.1%}, "
        f"{b['colour']:.1%}); wrong sketch: shape follows the sketch "
        f"{w['shape_follows_sketch']:.1%}"
    )
