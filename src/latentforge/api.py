"""The short Python API: `pipe = latentforge.load("default")`, `pipe("a red circle")`.

A `Pipeline` holds one loaded model folder and calls the pipelines with PIL images in and out,
the way diffusers users write `pipe(prompt).images[0]`; every sampling setting is a keyword
(`SampleSettings` fields: num, seed, sampler, steps, guidance, negative, ...; any other keyword
is a sampler knob such as eta). The tensor path stays one call away: `output_type="pt"` returns
(B, C, H, W) in [-1, 1], and `pipe.model` is the `LoadedModel` every pipeline function takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import UserError
from .io.embeddings import load_embeddings
from .io.images import from_pil, to_pil
from .io.lora import load_model_with_loras
from .io.model_folder import LoadedModel, default_model_dir
from .pipelines.common import describe_conditioning
from .pipelines.settings import SampleSettings

EMBEDDED = ("default", "upscaler")  # models that ship inside the package, by name


def _folder(name_or_path: str | Path) -> Path:
    if str(name_or_path) == "default":
        return default_model_dir()
    if str(name_or_path) == "upscaler":
        from .pipelines.superres import require_default_upscaler

        return require_default_upscaler()
    return Path(name_or_path)


class Pipeline:
    """A loaded model, callable: `pipe(prompt, num=4, seed=0)` -> a list of PIL images."""

    def __init__(self, model: LoadedModel, loras: list[str] | None = None):
        self.model = model
        self.loras = loras or []  # the fused LoRAs' NAME:SCALE labels

    def __repr__(self) -> str:
        c, h, w = self.model.output_shape
        return (
            f"Pipeline({self.model.path}, task={self.model.task!r}, "
            f"conditioning={self.model.conditioning!r}, {w}x{h}x{c})"
        )

    def _images(self, images: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor:
        if output_type == "pt":
            return images
        if output_type != "pil":
            raise UserError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        return [to_pil(x) for x in images]

    def _cond(self, prompt: str | list[str]) -> dict:
        """generate's labels / prompts for one prompt (every image) or one per image."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        conds = [describe_conditioning(self.model, p)[0] for p in prompts]
        return {k: [v for c in conds for v in c[k]] for k in conds[0]}

    def _size(self, settings: SampleSettings | None, overrides: dict) -> tuple[int, int, int]:
        """(C, H, W) of the call: the settings' width / height, else the model's."""
        s = SampleSettings.build(settings, **overrides)
        c, h, w = self.model.output_shape
        return c, s.height or h, s.width or w

    def _input(self, image: Image.Image | torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """A PIL image (resized to `size`) or a (B, C, H, W) tensor in [-1, 1]."""
        if torch.is_tensor(image):
            return image
        c, h, w = size
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        return from_pil(image.convert("RGB" if c == 3 else "L"), c)[None]

    def __call__(
        self,
        prompt: str | list[str] = "",
        *,
        settings: SampleSettings | None = None,
        output_type: str = "pil",
        callback=None,
        **overrides: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Text- (or class-) to-image. A list of prompts gives one image per prompt."""
        from .pipelines.generate import generate

        if self.model.task != "generate":
            what = "upscale(image)" if self.model.task == "superres" else "inpaint(image, mask)"
            raise UserError(f"{self.model.path} is a {self.model.task!r} model: use pipe.{what}")
        if not isinstance(prompt, str) and "num" not in overrides:
            overrides["num"] = len(prompt)
        out = generate(self.model, settings, **self._cond(prompt), callback=callback, **overrides)
        return self._images(out, output_type)

    def img2img(
        self,
        image: Image.Image | torch.Tensor,
        prompt: str | list[str] = "",
        *,
        strength: float = 0.6,
        settings: SampleSettings | None = None,
        output_type: str = "pil",
        **overrides: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """SDEdit: redraw `image` under the prompt; strength 1 ignores the image."""
        from .pipelines.img2img import img2img

        size = self._size(settings, overrides)
        out = img2img(self.model, self._input(image, size), settings, strength=strength,
                      **self._cond(prompt), **overrides)  # fmt: skip
        return self._images(out, output_type)

    def inpaint(
        self,
        image: Image.Image | torch.Tensor,
        mask: Image.Image | torch.Tensor,
        prompt: str | list[str] = "",
        *,
        settings: SampleSettings | None = None,
        output_type: str = "pil",
        **overrides: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Regenerate the white part of `mask`; the rest of `image` is kept exactly."""
        from .pipelines.inpaint import inpaint

        size = self._size(settings, overrides)
        if not torch.is_tensor(mask):
            _, h, w = size
            mask = from_pil(mask.convert("L").resize((w, h), Image.Resampling.NEAREST), 1) > 0
        out = inpaint(self.model, self._input(image, size), mask.float(), settings,
                      **self._cond(prompt), **overrides)  # fmt: skip
        return self._images(out, output_type)

    def upscale(
        self,
        image: Image.Image | torch.Tensor,
        *,
        settings: SampleSettings | None = None,
        output_type: str = "pil",
        **overrides: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """A super-resolution model's upscale of `image` (any size; tiled when large)."""
        from .pipelines.superres import upscale

        x = image if torch.is_tensor(image) else from_pil(image, self.model.output_shape[0])[None]
        return self._images(upscale(self.model, x, settings, **overrides), output_type)


def load(
    name_or_path: str | Path = "default",
    *,
    device: str | None = "auto",
    dtype: str = "fp32",
    loras: list[str | Path] | None = None,
    embeddings: list[str | Path] | None = None,
    embeddings_dir: str | Path | None = None,
) -> Pipeline:
    """A pipeline for an embedded model ("default": text-to-image on shapes scenes; "upscaler":
    x4 super-resolution) or a model folder (trained, or imported with `latentforge import`), on
    `device` ("auto": CUDA, else MPS, else CPU) with weights in `dtype` (fp32, bf16, fp16), with
    `loras` ("FILE[:SCALE]" each, docs/lora.md) fused into its weights, and the textual-inversion
    `embeddings` ("FILE[:TOKEN]" each) and those in `embeddings_dir` (default: the model's
    `embeddings/` folder) added to its text encoder (docs/prompts.md)."""
    model, labels = load_model_with_loras(
        _folder(name_or_path), loras or (), device=device, dtype=dtype
    )
    load_embeddings(model, [str(e) for e in embeddings or ()], embeddings_dir)
    return Pipeline(model, labels)
