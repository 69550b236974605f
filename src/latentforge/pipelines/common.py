"""What the pipelines share: conditioning (class / text / regions, under classifier-free
guidance), the noise schedule, the start of a partial (SDEdit) schedule, input batches.

Every pipeline conditions through `condition` (or `conditioning` for hand-made inputs) and
builds its schedule with `make_sigmas`, so a model behaves the same in text-to-image, img2img,
inpainting, super-resolution and interpolation.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
from torch import nn

from .. import sampling, schedules
from ..errors import UserError
from ..guidance import CFGDenoiser, Region, RegionalDenoiser, parse_interval, region_conditioning
from ..io.model_folder import LoadedModel, ModelFolder, check_dtype
from ..prompt_syntax import plain_text
from .layout import plan_layout
from .settings import SampleSettings, per_image, resolve_micro

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
    grid: tuple[int, int] | None = None,
    time_ids: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[nn.Module, dict]:
    """The denoiser to sample (CFG-wrapped when guidance != 1) and its per-image cond dict.

    Every pipeline (text2img, img2img, inpaint, interpolate) conditions through this one place.
    Text models: the negative prompt replaces the empty prompt of the unconditional branch.
    guidance_interval: (lo, hi) sigmas outside which guidance is skipped (one network call);
    None or (0, inf) guides every step. regions (text models): per-image region lists (one
    list for all images, or one per image; see `plan_regions`); images with regions are
    denoised box by box under the region prompts (`RegionalDenoiser`), the unconditional
    branch stays as it is. grid: the denoiser's (height, width) the regions are laid on
    (default: the model's training size). A model with a guidance embedding (`fast`) takes the
    scale as a network input instead (cond["guidance"]): one pass, no negative prompt.
    time_ids: SDXL's (positive, negative) size / crop ids (`sdxl_time_ids`; default: SDXL's
    defaults for the grid's output size).
    """
    if model.meta.guidance_embedding:
        denoiser, cond = _conditioning(model, num, labels, prompts, None, 1.0, None, regions, grid)
        cond["guidance"] = torch.full((num,), float(guidance), device=model.device)
        return denoiser, cond
    denoiser, cond = _conditioning(model, num, labels, prompts, negative, guidance,
                                   guidance_interval, regions, grid)  # fmt: skip
    if model.text_encoder is None or not model.text_encoder.pooled_dim:
        return denoiser, cond
    if time_ids is None:
        f = model.output_shape[-1] // model.image_shape[-1]
        h, w = tuple(model.image_shape[1:]) if grid is None else grid
        defaults = resolve_micro(SampleSettings(), model, (h * f, w * f))
        time_ids = sdxl_time_ids(model, SampleSettings(**defaults))
    return _added_conditioning(model, denoiser, cond, num, prompts, negative, time_ids)


def sdxl_time_ids(model: LoadedModel, settings: SampleSettings) -> tuple[list[float], list[float]]:
    """SDXL's added time ids (positive, negative) from resolved settings: original size, crop
    and target size (6 numbers), or the aesthetic score in place of the target size (the
    refiner, 5), as diffusers' `_get_add_time_ids`."""
    last = "aesthetic_score" if model.text_encoder.requires_aesthetics_score else "target_size"

    def ids(prefix: str) -> list[float]:
        parts = [getattr(settings, prefix + k) for k in ("original_size", "crops_coords_top_left")]
        parts.append(getattr(settings, prefix + last))
        return [float(v) for p in parts for v in (p if isinstance(p, tuple) else (p,))]

    return ids(""), ids("negative_")


def _added_conditioning(
    model: LoadedModel,
    denoiser: nn.Module,
    cond: dict,
    num: int,
    prompts: list[str] | None,
    negative: str | list[str] | None,
    time_ids: tuple[Sequence[float], Sequence[float]],
) -> tuple[nn.Module, dict]:
    """SDXL's added conditioning in the cond dict: the pooled prompt embedding (`text_embeds`)
    and the size / crop ids (`time_ids`); the negative prompts' and negative ids in the
    unconditional half. With `force_zeros_for_empty_prompt`, an empty negative prompt is
    zeros (its token states and pooled embedding), as in diffusers' SDXL pipelines."""
    encoder, device = model.text_encoder, model.device
    prompts = per_image(prompts or [""], num, "prompts")

    def ids(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor([list(values)] * num, dtype=torch.float32, device=device)

    cond = {**cond, "text_embeds": encoder.encode_pooled(prompts).to(device),
            "time_ids": ids(time_ids[0])}  # fmt: skip
    if isinstance(denoiser, CFGDenoiser):
        negatives = per_image([negative] if isinstance(negative, str) else negative or [""],
                              num, "negative prompts")  # fmt: skip
        uncond = {**denoiser.uncond, "text_embeds": encoder.encode_pooled(negatives).to(device),
                  "time_ids": ids(time_ids[1])}  # fmt: skip
        if encoder.force_zeros_for_empty_prompt:
            empty = torch.tensor([n == "" for n in negatives], device=device)
            for key in ("context", "text_embeds"):
                rows = empty.view(-1, *[1] * (uncond[key].ndim - 1))
                uncond[key] = uncond[key].masked_fill(rows, 0.0)
        denoiser.uncond = uncond
    return denoiser, cond


def _conditioning(
    model: LoadedModel,
    num: int,
    labels: list[int | None] | None,
    prompts: list[str] | None,
    negative: str | list[str] | None,
    guidance: float,
    guidance_interval: Sequence[float | None] | None,
    regions: list[list[Region]] | None,
    grid: tuple[int, int] | None,
) -> tuple[nn.Module, dict]:
    interval = parse_interval(guidance_interval)
    denoiser, cond = model.denoiser, {}
    if model.text_encoder is not None:
        prompts = per_image(prompts or [""], num, "prompts")
        negatives = per_image([negative] if isinstance(negative, str) else negative or [""],
                               num, "negative prompts")  # fmt: skip
        encoder = model.text_encoder
        context, mask = encoder.encode_prompts(prompts)  # A1111 syntax, chunked
        if guidance != 1.0:  # both halves of guidance run in one batch: as many tokens
            u_context, u_mask = encoder.encode_prompts(negatives)
            length = max(context.shape[1], u_context.shape[1])
            context, mask = encoder.pad_context(context, mask, length)
            u_context, u_mask = encoder.pad_context(u_context, u_mask, length)
        cond = {"context": context, "context_mask": mask}
        if regions and any(regions):
            lists = per_image(list(regions), num, "region lists")
            grid = tuple(model.image_shape[1:]) if grid is None else grid
            region = region_conditioning(encoder, lists, grid)
            # batched with the prompts' context by RegionalDenoiser: as many tokens
            region["region_context"], region["region_context_mask"] = encoder.pad_context(
                region["region_context"], region["region_context_mask"], context.shape[1]
            )
            cond.update(region)
            denoiser = RegionalDenoiser(denoiser)
        if guidance != 1.0:
            uncond = {"context": u_context, "context_mask": u_mask}
            # no regions in the unconditional half: zero weights
            uncond.update(
                {k: torch.zeros_like(v) for k, v in cond.items() if k.startswith("region_")}
            )
            denoiser = CFGDenoiser(denoiser, guidance, uncond, interval=interval)
        return denoiser, cond
    if model.num_classes:
        null = model.num_classes
        labels = per_image(labels or [None], num, "labels")
        ids = torch.tensor([null if lab is None else int(lab) for lab in labels])
        ids = ids.to(model.device)
        if ((ids < 0) | (ids > null)).any():
            raise UserError(f"labels must be in 0..{null - 1}")
        cond = {"class_labels": ids}
        if guidance != 1.0:
            uncond = {"class_labels": torch.full_like(ids, null)}
            denoiser = CFGDenoiser(denoiser, guidance, uncond, interval=interval)
    return denoiser, cond


def plan_regions(
    model: LoadedModel, prompts: list[str] | None, num: int, settings: SampleSettings
) -> list[list[Region]] | None:
    """Per-image regions for a text model (resolved settings): the settings' regions for
    every image when given, else what its layout planner reads from each prompt; None for
    models without a text encoder or with layout "none"."""
    if model.text_encoder is None:
        return None
    if settings.regions:
        return [list(settings.regions)] * num
    if settings.layout in (None, "none"):
        return None
    return [
        plan_layout(settings.layout, plain_text(p))  # the words, without A1111's syntax
        for p in per_image(prompts or [""], num, "prompts")
    ]


def precision_context(
    model: LoadedModel, settings: SampleSettings
) -> contextlib.AbstractContextManager:
    """Autocast for the denoiser under the settings' precision, or the weights' dtype when the
    settings ask for fp32 (bf16 / fp16 weights compute in their own precision)."""
    name = settings.precision if settings.precision != "fp32" else model.dtype
    if name == "fp32":
        return contextlib.nullcontext()
    dtype = check_dtype(name, model.device)
    return torch.autocast(model.device.type, dtype=dtype)


TILED_DECODE_AREA = 4  # latents over this many times the trained area decode in tiles


def decode(model: LoadedModel, x: torch.Tensor, settings: SampleSettings) -> torch.Tensor:
    """Latents -> images in [-1, 1] (float32, on the CPU). fp16 decodes in fp32, outside the
    autocast: SD's VAE overflows in fp16; bf16 decodes in bf16. With settings.vae_tiling
    "auto", latents larger than TILED_DECODE_AREA times the model's trained size decode one
    image at a time, in tiles of twice the trained side (the VAE's memory grows with the
    pixels; tiles differ from one pass by GroupNorm's statistics, so sizes up to that bound
    decode whole); "on" tiles and slices at any size, "off" never."""
    h, w = x.shape[-2:]
    trained = model.image_shape[-1]
    tiling = settings.vae_tiling
    large = tiling == "on" or (tiling == "auto" and h * w > TILED_DECODE_AREA * trained**2)
    kw = {"tile_size": 2 * trained, "slice_batch": True} if large else {}
    if (settings.precision if settings.precision != "fp32" else model.dtype) == "fp16":
        with torch.autocast(model.device.type, enabled=False):
            images = model.decode(x.float(), **kw)
    else:
        with precision_context(model, settings):
            images = model.decode(x, **kw)
    if not bool(torch.isfinite(images).all()):  # clamp would turn NaN into a black image
        raise sampling.NonFiniteError(
            f"the decoder produced NaN/Inf at {settings.precision} "
            f"(weights {model.dtype}): decode in fp32 (--dtype fp32)"
        )
    return images.float().clamp(-1, 1).cpu()


def condition(
    model: LoadedModel,
    num: int,
    settings: SampleSettings,
    *,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
) -> tuple[nn.Module, dict]:
    """`conditioning` under resolved settings: their guidance, interval, negative prompt and
    regions (given, or planned from the prompts), laid on the grid of their output size."""
    return conditioning(
        model, num, labels=labels, prompts=prompts, negative=settings.negative or None,
        guidance=settings.guidance, guidance_interval=settings.guidance_interval,
        regions=plan_regions(model, prompts, num, settings),
        grid=settings.latent_size(model),
        time_ids=sdxl_time_ids(model, settings) if settings.original_size else None,
    )  # fmt: skip


def schedule_tail(
    model: LoadedModel, steps: int, strength: float, spacing: str | None = None
) -> torch.Tensor:
    """The last round(strength * steps) intervals of the full schedule: sigmas[steps - k:]
    (k + 1 levels, ending in 0; a single 0 when k == 0)."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be in [0, 1], got {strength}")
    k = round(strength * steps)
    return make_sigmas(model, steps, spacing)[steps - k :]


def start_point(
    model: LoadedModel, z: torch.Tensor, sigmas: torch.Tensor, full: bool, gen: sampling.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at sigmas[0], the unit noise eps in it): SDEdit's x = z + sigma_start * eps.

    `full` (the whole schedule runs): the prior exactly as `generate` draws it (same draws from
    the same generator), so strength 1 is text-to-image bit for bit; z is not used.
    """
    sigma = float(sigmas[0])
    if full:
        x = sampling.prior_noise(model.denoiser, z.shape, sigma, gen).to(z)
        return x, x / _prior_scale(model, sigma)
    eps = sampling.randn_like(torch.empty(z.shape), gen).to(z)
    return z + sigma * eps, eps


def _prior_scale(model: LoadedModel, sigma: float) -> float:
    den = model.denoiser
    return den.prior_scale(sigma) if hasattr(den, "prior_scale") else sigma


def batch_images(images: torch.Tensor, num: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) in the model's output shape -> a batch of max(B, num): one
    image is repeated for num seeds; B > 1 images need num 1 or num == B."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise UserError(
            f"images must be (B, {', '.join(map(str, shape))}) for this model, "
            f"got {tuple(images.shape)}"
        )
    if num < 1:
        raise UserError(f"num must be >= 1, got {num}")
    B = images.shape[0]
    if B > 1 and num not in (1, B):
        raise UserError(f"got {B} images and num={num}; give one image or num equal to {B}")
    return images.expand(max(B, num), *shape).float()


def on_device(model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """An input tensor (images, masks) moved to where the model runs."""
    return x.to(model.device)


def require_task(model: LoadedModel, task: str) -> None:
    got = model.task
    if got != task:
        raise UserError(f"{model.path} is a {got!r} model; this needs a --task {task} model")


def with_image_cond(denoiser: nn.Module, cond: dict, extra: dict) -> tuple[nn.Module, dict]:
    """Add the conditioning image's entries to cond, and to both halves of classifier-free
    guidance: guidance contrasts the class / text only, never the image."""
    if isinstance(denoiser, CFGDenoiser):
        denoiser.uncond = {**denoiser.uncond, **extra}
    return denoiser, {**cond, **extra}
