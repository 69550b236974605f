"""Super-resolution with a `superres` model (SR3, Saharia et al. 2022).

The low-res image is resized to the denoiser's resolution, noised once to `noise_level`
(noise conditioning augmentation, Ho et al. 2022, sec. 4.2; the model is told the level) and
concatenated to x at every step through the cond dict; any registered sampler runs unchanged.

Outputs larger than the model's training resolution are made in overlapping tiles: each tile
is an independent sample with its own seed, all tiles of all images go through one
`sampling.sample` call, and the decoded tiles are blended with weights that ramp linearly
across the overlaps. The conditioning image is noised once per image before it is cut, so
overlapping tiles see the same pixels there.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .. import sampling
from ..errors import UserError
from ..io.checkpoint import MODEL_JSON
from ..io.model_folder import LoadedModel
from ..models.conditioned import augment, lowres_condition
from .common import (
    batch_images,
    conditioning,
    decode,
    make_sigmas,
    on_device,
    precision_context,
    require_task,
    with_image_cond,
)
from .settings import SampleSettings, per_image

UPSCALER = "upscaler"
DEFAULT_NOISE_LEVEL = 0.1
TRAIN_HINT = "latentforge train diffusion --task superres --scale 4 --data shapes:64 --out runs/sr4"


def default_upscaler_dir() -> Path:
    """The embedded x4 upscaler's folder inside the package (scripts/train-upscaler.sh)."""
    return Path(str(resources.files("latentforge") / "assets" / UPSCALER))


def require_default_upscaler() -> Path:
    """The embedded upscaler's folder, or a one-line error saying how to get an upscaler."""
    folder = default_upscaler_dir()
    if not (folder / MODEL_JSON).is_file():
        raise UserError(f"the embedded upscaler is missing from {folder}; pass --model DIR, "
                        f"or train one: {TRAIN_HINT}")  # fmt: skip
    return folder


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of size `tile` that cover [0, length) with neighbours sharing
    at least `overlap` (less 1 for rounding); one tile when it fits."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp(size: int, overlap: int) -> torch.Tensor:
    """1-D blend weights, (size,): linear from 1 / (overlap + 1) at each end to 1 at `overlap`
    pixels in; positive everywhere, so the normalised blend is defined at the image border."""
    j = torch.arange(size, dtype=torch.float32)
    return torch.minimum((j + 1) / (overlap + 1), (size - j) / (overlap + 1)).clamp(max=1)


def blend_tiles(
    tiles: torch.Tensor, starts: list[tuple[int, int]], size: tuple[int, int], overlap: int
) -> torch.Tensor:
    """tiles (B, K, C, th, tw) placed at starts -> (B, C, H, W), a weighted average where they
    overlap."""
    B, _, C, th, tw = tiles.shape
    w = ramp(th, overlap)[:, None] * ramp(tw, overlap)[None]  # (th, tw)
    acc = tiles.new_zeros(B, C, *size)
    norm = tiles.new_zeros(*size)
    for k, (y, x) in enumerate(starts):
        acc[..., y : y + th, x : x + tw] += tiles[:, k] * w
        norm[y : y + th, x : x + tw] += w
    return acc / norm


def tile_seed(seed: int, k: int) -> int:
    """The seed of tile k of the image drawn with `seed` (independent of the batch)."""
    return (seed * 1_000_003 + k) % 2**63


def tile_grid(model: LoadedModel, h: int, w: int, tile: int | None = None):
    """How an h x w input is upscaled: (f, output (H, W), the denoiser's (hz, wz), a tile's
    (th, tw) and overlap there, the tiles' (y, x) starts); f is the VAE's factor (1 for pixels).
    UserError for sizes the VAE's grid cannot take."""
    s, resolution = model.meta.scale, model.output_shape[1]
    f = resolution // model.image_shape[1]
    H, W = h * s, w * s
    if H % f or W % f:
        raise UserError(f"the output {H}x{W} must be a multiple of the VAE's f={f}")
    tile = resolution if tile is None else tile
    if tile % f or tile < 2 * f:
        raise UserError(f"tile must be a multiple of {f} and at least {2 * f}, got {tile}")
    hz, wz, tz = H // f, W // f, tile // f  # in the denoiser's space
    overlap = max(1, tz // 4)
    starts = [(y, x) for y in tile_starts(hz, tz, overlap) for x in tile_starts(wz, tz, overlap)]
    return f, (H, W), (hz, wz), (min(tz, hz), min(tz, wz)), overlap, starts


def sampler_runs(
    model: LoadedModel, h: int, w: int, num: int = 1, tile: int | None = None, tile_batch: int = 16
) -> int:
    """How many sampler calls `upscale` makes for `num` h x w images: the callback sees every
    step of each (a progress bar's total is this times the steps)."""
    return math.ceil(num * len(tile_grid(model, h, w, tile)[-1]) / tile_batch)


def _repeat(values, n: int, k: int, what: str):
    """Per-image values (one for all, or n) -> one per tile, image-major."""
    if values is None:
        return values
    return [v for v in per_image(list(values), n, what) for _ in range(k)]


@torch.no_grad()
def upscale(
    model: LoadedModel,
    images: torch.Tensor,
    settings: SampleSettings | None = None,
    *,
    scale: int | None = None,
    noise_level: float = DEFAULT_NOISE_LEVEL,
    labels: list[int | None] | None = None,
    prompts: list[str] | None = None,
    tile: int | None = None,
    tile_batch: int = 16,
    callback: sampling.Callback = None,
    **overrides: Any,
) -> torch.Tensor:
    """images (B, C, h, w) in [-1, 1] -> (max(B, num), C, h * s, w * s), s the model's scale;
    image i (a sample per seed when one image is given with num > 1) uses seed `seed + i`.

    `scale`, when given, must be the model's. `noise_level`: the augmentation std added to the
    low-res image (trained on [0, 0.3]; more hides more of its noise and artefacts, and invents
    more). `tile`: tile size in output pixels (default: the model's resolution); outputs no
    larger than a tile are made in one pass at their own size. `tile_batch`: at most this many
    tiles (of all images) go through one sampler call, so peak memory is bounded by it and not
    by the image size (each tile draws from its own generator: the result does not depend on
    it, up to float rounding). The callback sees every step of every such call. settings /
    keyword overrides: as for `generate` (no regional prompting: tiles are not the image).
    """
    require_task(model, "superres")
    s = model.meta.scale
    if scale is not None and scale != s:
        raise UserError(f"{model.path} upscales x{s}, not x{scale}")
    if not 0.0 <= noise_level <= 1.0:
        raise UserError(f"noise_level must be in [0, 1], got {noise_level}")
    st = SampleSettings.build(settings, **overrides).resolve(model)
    seed = st.seed
    channels = model.output_shape[0]
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise UserError(f"images must be (B, C, h, w), got {tuple(images.shape)}")
    if not isinstance(tile_batch, int) or tile_batch < 1:
        raise UserError(f"tile_batch must be an integer >= 1, got {tile_batch!r}")
    images = on_device(model, batch_images(images, st.num, (channels, *images.shape[-2:])))
    n, (h, w) = images.shape[0], images.shape[-2:]
    f, (H, W), (hz, wz), (th, tw), overlap, starts = tile_grid(model, h, w, tile)
    K = len(starts)

    # the conditioning image at the denoiser's resolution, noised once per image
    gen = sampling.BatchGenerator(range(seed, seed + n))
    level = torch.full((n,), float(noise_level), device=images.device)
    cond_image = lowres_condition(images, (hz, wz))  # (n, C, hz, wz)
    cond_image = augment(cond_image, level, sampling.randn_like(cond_image, gen))
    concat = torch.stack([cond_image[..., y : y + th, x : x + tw] for y, x in starts], 1)
    concat = concat.flatten(0, 1)  # (n * K, C, th, tw), image-major
    if K > 1:  # one independent sample per tile
        gen = sampling.BatchGenerator([tile_seed(seed + i, k) for i in range(n) for k in range(K)])

    sigmas = make_sigmas(model, st.steps, st.spacing)
    labels, prompts = _repeat(labels, n, K, "labels"), _repeat(prompts, n, K, "prompts")
    noise_levels = level.repeat_interleave(K)
    chunks = []
    for a in range(0, n * K, tile_batch):  # a bounded batch of tiles per sampler call
        b = min(a + tile_batch, n * K)
        part = gen.subset(a, b)
        x = sampling.prior_noise(
            model.denoiser, (b - a, model.image_shape[0], th, tw), float(sigmas[0]), part
        ).to(model.device)
        denoiser, cond = conditioning(
            model, b - a, labels=labels[a:b] if labels else None,
            prompts=prompts[a:b] if prompts else None, negative=st.negative or None,
            guidance=st.guidance, guidance_interval=st.guidance_interval,
        )  # fmt: skip
        extra = {"concat": concat[a:b], "noise_level": noise_levels[a:b]}
        denoiser, cond = with_image_cond(denoiser, cond, extra)
        with precision_context(model, st):
            out = sampling.sample(
                st.sampler, denoiser, x, sigmas, cond=cond, generator=part, callback=callback,
                **st.knobs,
            )  # fmt: skip
        chunks.append(decode(model, out, st))  # (b - a, C, th * f, tw * f), on the CPU
    pixels = torch.cat(chunks)
    if K == 1:
        return pixels
    tiles = pixels.unflatten(0, (n, K))  # (n, K, C, th * f, tw * f)
    return blend_tiles(tiles, [(y * f, x * f) for y, x in starts], (H, W), overlap * f)
