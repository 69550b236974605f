"""Load a model folder and sample images from it: the one text2img/class2img composition.

encode conditioning -> prior noise -> sampler (any registered one) -> images in [-1, 1].
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import sampling, schedules
from ..errors import UserError
from ..guidance import CFGDenoiser, RegionalDenoiser, interval_to_json, parse_interval
from ..io.model_folder import LoadedModel, ModelFolder, load_diffusion_model
from .layout import LAYOUTS, Region, plan_layout, region_conditioning

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def labels_from_prompt(prompt: str, class_names: list[str]) -> int | None:
    """The class a prompt names (a class name or a digit word / numeral), or None."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    names = [n.lower() for n in class_names]
    for w in words:
        if w in names:
            return names.index(w)
        if w in _NUMBER_WORDS and str(_NUMBER_WORDS.index(w)) in names:
            return names.index(str(_NUMBER_WORDS.index(w)))
    return None


def make_sigmas(model: LoadedModel, steps: int, spacing: str | None = None) -> torch.Tensor:
    den = model.denoiser
    spacing = spacing or model.defaults.spacing or "karras"
    return schedules.get_sigmas(
        spacing,
        steps,
        sigma_min=den.sigma_min,
        sigma_max=den.sigma_max,
        train_sigmas=getattr(den, "train_sigmas64", None),
    )


def conditioning(
    model: LoadedModel,
    num: int,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    negative: str | list[str] | None = None,
    guidance: float = 1.0,
    guidance_interval: Sequence[float | None] | None = None,
    regions: list[list[Region]] | None = None,
) -> tuple[nn.Module, dict]:
    """The denoiser to sample (CFG-wrapped when guidance != 1) and its per-image cond dict.

    Every pipeline (text2img, img2img, inpaint, interpolate) conditions through this one place.
    Text models: the negative prompt replaces the empty prompt of the unconditional branch.
    guidance_interval: (lo, hi) sigmas outside which guidance is skipped (one network call);
    None takes the model's default (`sampling.guidance_interval` in model.json), (0, inf)
    guides every step. regions (text models): per-image region lists (one list for all
    images, or one per image; see `layout.py`); images with regions are denoised box by box
    under the region prompts (`RegionalDenoiser`), the unconditional branch stays as it is.
    """
    interval = resolve_guidance_interval(model, guidance_interval)
    denoiser, cond = model.denoiser, {}
    if model.text_encoder is not None:
        prompts = _per_image(prompts or [""], num, "prompts")
        negatives = _per_image([negative] if isinstance(negative, str) else negative or [""],
                               num, "negative prompts")  # fmt: skip
        context, mask = model.text_encoder.encode(prompts)
        cond = {"context": context, "context_mask": mask}
        if regions and any(regions):
            per_image = _per_image(list(regions), num, "region lists")
            cond.update(region_conditioning(model.text_encoder, per_image, model.image_shape[1:]))
            denoiser = RegionalDenoiser(denoiser)
        if guidance != 1.0:
            u_context, u_mask = model.text_encoder.encode(negatives)
            uncond = {"context": u_context, "context_mask": u_mask}
            # no regions in the unconditional half: zero weights
            uncond.update(
                {k: torch.zeros_like(v) for k, v in cond.items() if k.startswith("region_")}
            )
            denoiser = CFGDenoiser(denoiser, guidance, uncond, interval=interval)
        return denoiser, cond
    if model.num_classes:
        null = model.num_classes
        labels = _per_image(labels or [None], num, "labels")
        ids = torch.tensor([null if lab is None else int(lab) for lab in labels])
        if ((ids < 0) | (ids > null)).any():
            raise UserError(f"labels must be in 0..{null - 1}")
        cond = {"class_labels": ids}
        if guidance != 1.0:
            uncond = {"class_labels": torch.full_like(ids, null)}
            denoiser = CFGDenoiser(denoiser, guidance, uncond, interval=interval)
    return denoiser, cond


def resolve_guidance_interval(
    model: ModelFolder, value: Sequence[float | None] | None
) -> tuple[float, float] | None:
    """The guidance interval to use: `value`, or the model folder's default when None."""
    if value is None:
        value = model.defaults.guidance_interval
    return parse_interval(value)


def resolve_layout(model: ModelFolder, value: str | None) -> str:
    """The layout planner to use: `value`, or the model folder's default (`sampling.layout`
    in model.json; "none" where it names none)."""
    name = value or model.defaults.layout or "none"
    if name not in LAYOUTS:
        raise UserError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    return name


def plan_regions(
    model: LoadedModel,
    prompts: list[str] | None,
    num: int,
    layout: str | None = None,
    regions: Sequence[Region] | None = None,
) -> list[list[Region]] | None:
    """Per-image regions for a text model: `regions` for every image when given, else what
    the layout planner reads from each prompt; None for models without a text encoder."""
    if model.text_encoder is None:
        if regions:
            raise UserError("regions need a text-conditioned model")
        return None
    if regions:
        return [list(regions)] * num
    name = resolve_layout(model, layout)
    if name == "none":
        return None
    return [plan_layout(name, p) for p in _per_image(prompts or [""], num, "prompts")]


def _per_image(values: list, num: int, what: str) -> list:
    if len(values) == 1:
        return list(values) * num
    if len(values) != num:
        raise UserError(f"got {len(values)} {what} for {num} images")
    return list(values)


def sampling_defaults(
    model: ModelFolder, sampler: str | None, steps: int | None, guidance: float | None
) -> tuple[str, int, float]:
    """Fill unset sampler / steps / guidance from the model folder's defaults and validate."""
    defaults = model.defaults
    sampler = sampler or defaults.sampler
    steps = defaults.steps if steps is None else steps
    guidance = defaults.guidance if guidance is None else guidance
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps}")
    sampling.get_sampler(sampler)  # validate the name before any work
    return sampler, steps, guidance


@torch.no_grad()
def generate(
    model: LoadedModel,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    negative: str | list[str] | None = None,
    num: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    guidance: float | None = None,
    guidance_interval: Sequence[float | None] | None = None,
    layout: str | None = None,
    regions: Sequence[Region] | None = None,
    callback: sampling.Callback = None,
    noise: torch.Tensor | None = None,
    bf16: bool = False,
    **knobs,
) -> torch.Tensor:
    """Sample `num` images (B, C, H, W) in [-1, 1]; image i uses seed `seed + i`.

    labels (class models) / prompts (text models): one per image or one for all; guidance != 1
    applies classifier-free guidance against the null class / the negative prompt, at the noise
    levels inside guidance_interval (default: the model's; see `conditioning`).
    layout (text models): the planner that reads regions from each prompt ("shapes", "none";
    default: the model's `sampling.layout`); regions: one region list for every image, which
    replaces the planner's (see `layout.py`).
    noise: the unit Gaussian noise (num, *model.image_shape) to start from instead of the seeds'
    draw (the seeds still drive stochastic samplers); it is scaled to the prior std as drawn
    noise is. For an imported SD model it is what diffusers' pipelines take as `latents=` (with
    DDIM, or Euler under leading spacing: tests/test_sd_pipeline.py).
    bf16: run the denoiser and the decoder under bf16 autocast (the text encoder, the noise and
    the sampler's arithmetic stay fp32). About 1.5x the images/s on a CPU with AVX512-BF16 or
    AMX (docs/text-to-image.md); CPUs without bf16 units emulate it slowly. The images differ
    from fp32 ones by bf16 rounding, and are as deterministic.
    """
    if num < 1:
        raise UserError(f"num must be >= 1, got {num}")
    sampler, steps, guidance = sampling_defaults(model, sampler, steps, guidance)
    sigmas = make_sigmas(model, steps, spacing)
    gen = sampling.BatchGenerator(range(seed, seed + num))
    shape = (num, *model.image_shape)
    x = sampling.prior_noise(model.denoiser, shape, float(sigmas[0]), gen, noise)
    denoiser, cond = conditioning(
        model, num, labels=labels, prompts=prompts, negative=negative, guidance=guidance,
        guidance_interval=guidance_interval,
        regions=plan_regions(model, prompts, num, layout, regions),
    )  # fmt: skip
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = sampling.sample(
            sampler, denoiser, x, sigmas, cond=cond, generator=gen, callback=callback, **knobs
        )
        images = model.decode(out)
    return images.float().clamp(-1, 1)


# ----- the CLI's generate: PNG in, PNG out, parameters in the PNG's text chunks -----------------
PARAM_KEYS = (
    "prompt", "negative", "seed", "num", "sampler", "steps", "spacing", "guidance",
    "guidance_interval", "options", "layout", "regions", "bf16",
)  # fmt: skip


def describe_conditioning(model: ModelFolder, prompt: str) -> tuple[dict, str]:
    """Keyword arguments for `generate` from a prompt, and a few words saying what they mean."""
    if model.conditioning == "text":
        return {"prompts": [prompt]}, f"prompt {prompt!r}"
    if model.conditioning == "class":
        label = labels_from_prompt(prompt, model.class_names)
        if label is None:
            return {"labels": [None]}, "no class named in the prompt: unconditional"
        return {"labels": [label]}, f"class {model.class_names[label]!r}"
    return {}, "unconditional model"


def generate_to_png(
    model_dir: str | Path | None,
    out: str | Path,
    *,
    prompt: str = "",
    negative: str = "",
    preview: str | Path | None = None,
    **params,
) -> dict:
    """Generate, write a grid PNG whose text chunks hold every parameter (so `--from-png`
    reproduces it bit-exactly), and optionally a GIF with, at every step, the noisy state (first
    row) and the x0 estimate (second row), decoded."""
    from ..io.images import save_grid

    model = load_diffusion_model(model_dir)
    cond_kwargs, what = describe_conditioning(model, prompt or "")
    sampler, steps, guidance = sampling_defaults(
        model, params.pop("sampler", None), params.pop("steps", None), params.pop("guidance", None)
    )
    options = params.pop("options", None) or {}  # sampler knobs, e.g. {"eta": 0.5}
    # stored resolved, so --from-png reproduces it whatever the model's default
    interval = interval_to_json(
        resolve_guidance_interval(model, params.pop("guidance_interval", None))
    )
    regions = params.pop("regions", None) or None
    layout = params.pop("layout", None)
    # explicit regions replace the planner: stored as they are, with layout "none"
    text = model.text_encoder is not None and not regions
    layout = resolve_layout(model, layout) if text else "none"
    params = {k: v for k, v in params.items() if v is not None}
    num, seed = params.setdefault("num", 1), params.setdefault("seed", 0)
    frames: list[torch.Tensor] = []
    callback = None
    if preview:

        def callback(step, sigma, x, denoised):
            # the noisy state (shown as x_t = x / sqrt(1 + sigma^2)) beside the x0 estimate
            noisy = model.decode(x / (1 + sigma**2).sqrt()).clamp(-1, 1)
            frames.append(torch.cat([noisy, model.decode(denoised).clamp(-1, 1)]))

    images = generate(
        model, **cond_kwargs, negative=negative or None, sampler=sampler, steps=steps,
        guidance=guidance, guidance_interval=interval, layout=layout, regions=regions,
        callback=callback, **params, **options,
    )  # fmt: skip
    meta = {
        "prompt": prompt or "", "negative": negative or "", "seed": seed, "num": num,
        "sampler": sampler, "steps": steps, "guidance": guidance,
        "guidance_interval": json.dumps(interval),
        "spacing": params.get("spacing") or model.defaults.spacing or "",
        "options": json.dumps(options, sort_keys=True) if options else "",
        "layout": layout,
        "regions": json.dumps([r.to_json() for r in regions]) if regions else "",
        "precision": "bf16" if params.get("bf16") else "fp32",
        "model": model.sha256,
        "model_path": "" if model_dir is None else str(Path(model_dir).resolve()),
    }  # fmt: skip
    save_grid(images, out, **meta)
    if preview:
        from ..io.images import save_gif

        save_gif([*frames, torch.cat([images, images])], preview)
    return {"num": num, "conditioning": what, **meta}


def params_from_png(path: str | Path) -> dict:
    """The generate parameters stored in a PNG's text chunks, typed again."""
    from ..io.images import read_png_metadata

    text = read_png_metadata(path)
    if "seed" not in text or "steps" not in text:
        raise UserError(f"{path} holds no latentforge generate parameters")
    out: dict = {
        "prompt": text.get("prompt", ""),
        "negative": text.get("negative", ""),
        "seed": int(text["seed"]),
        "num": int(text.get("num", 1)),
        "sampler": text.get("sampler") or None,
        "steps": int(text["steps"]),
        "guidance": float(text.get("guidance", 1.0)),
        "guidance_interval": json.loads(text["guidance_interval"])
        if text.get("guidance_interval")
        else None,
        "spacing": text.get("spacing") or None,
        "options": json.loads(text["options"]) if text.get("options") else None,
        # PNGs from before regional prompting: no layout
        "layout": text.get("layout") or "none",
        "regions": [Region.from_json(r) for r in json.loads(text["regions"])]
        if text.get("regions")
        else None,
    }
    # PNGs from before --bf16 hold no precision: fp32
    out["bf16"] = text.get("precision") == "bf16"
    if text.get("model_path"):
        out["model_path"] = text["model_path"]
    return out
