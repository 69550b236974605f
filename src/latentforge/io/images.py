"""Tensor <-> PIL conversions, image grids and PNG text metadata (ours and A1111's)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..errors import UserError
from . import a1111


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] -> 8-bit PIL image (L for one channel, RGB for three)."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def from_pil(img: Image.Image, channels: int = 3) -> torch.Tensor:
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return from_pil(img, channels)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (C, H', W') tiled with `pad` pixels of -1 (black) between tiles."""
    B, C, H, W = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = images.new_full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), -1.0)
    for i in range(B):
        r, c = divmod(i, nrow)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y : y + H, x : x + W] = images[i]
    return grid


def png_info(metadata: Mapping | None) -> PngImagePlugin.PngInfo:
    """PNG text chunks for `metadata` (lists as JSON), and beside them A1111's `parameters`
    chunk when the metadata records a generation (`a1111.format_parameters`)."""
    info = PngImagePlugin.PngInfo()
    metadata = metadata or {}
    for k, v in metadata.items():
        info.add_text(k, json.dumps(v) if isinstance(v, list) else str(v))
    parameters = None if "parameters" in metadata else a1111.format_parameters(metadata)
    if parameters is not None:
        info.add_text("parameters", parameters)  # tEXt, iTXt where not Latin-1: as A1111
    return info


def save_png(image: torch.Tensor, path: str | Path, metadata: dict | None = None) -> None:
    """Save (C, H, W) as PNG, parameters as text chunks (read back with `read_png_metadata`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path, pnginfo=png_info(metadata))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, **meta) -> None:
    """A grid PNG of (B, C, H, W); a single image is written as it is, without a frame, so the
    file can be fed back to img2img / inpaint / interpolate at the model's size."""
    image = images[0] if len(images) == 1 else make_grid(images, nrow)
    save_png(image, path, meta or None)


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """A PNG's text chunks; when it holds no latentforge parameters (no `seed`) but A1111's
    `parameters` chunk, that chunk read as latentforge's keys beside the chunks themselves."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            text = dict(getattr(img, "text", {}) or {})
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{path}: not a readable PNG") from None
    return with_a1111(text, str(path))


def with_a1111(text: Mapping[str, str], where: str = "PNG") -> dict[str, str]:
    """`text` (a PNG's chunks), with A1111's `parameters` chunk read into latentforge's keys
    when the chunks hold no latentforge parameters of their own."""
    text = dict(text)
    if "seed" not in text and text.get("parameters"):
        text.update(a1111.to_png_meta(a1111.parse_parameters(text["parameters"]), where))
    return text


def save_gif(batches: list[torch.Tensor], path: str | Path, ms_per_frame: int = 120) -> None:
    """One frame per (B, C, H, W) batch (two rows), small images scaled up (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [to_pil(make_grid(b, nrow=(len(b) + 1) // 2)) for b in batches]
    if frames[0].width < 256:
        scale = max(1, 256 // frames[0].width)
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    frames = [f.convert("P", palette=Image.ADAPTIVE) if f.mode == "RGB" else f for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
