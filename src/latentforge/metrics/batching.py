"""Running an evaluator's model calls over n items in batches, with a progress bar and timing;
sampling n images that way from any model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import UserError
from ..io.model_folder import LoadedModel
from ..pipelines.common import labels_from_prompt
from ..pipelines.generate import generate
from ..pipelines.settings import SampleSettings


def run_batched(
    fn: Callable[[int, int], torch.Tensor],
    n: int,
    batch: int,
    *,
    progress: bool = False,
    desc: str = "sampling",
) -> tuple[torch.Tensor, float]:
    """fn(start, stop) for consecutive slices of range(n) of at most `batch` items; returns the
    results concatenated along dim 0 and the seconds spent inside fn."""
    from tqdm.auto import tqdm

    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    out, seconds = [], 0.0
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            t0 = time.perf_counter()
            out.append(fn(start, stop))
            seconds += time.perf_counter() - t0
            bar.update(stop - start)
    return torch.cat(out), seconds


def generate_batched(
    model: LoadedModel,
    settings: SampleSettings,
    *,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int | None] | None = None,
    batch: int = 64,
    progress: bool = False,
    desc: str = "sampling",
) -> tuple[torch.Tensor, float]:
    """``settings.num`` images in batches; image i uses seed ``settings.seed + i`` whatever the
    batch size.

    ``prompts`` / ``labels``: one per image (text / class models). Returns the images
    (num, C, H, W) in [-1, 1] and the seconds spent sampling.
    """

    def run(start: int, stop: int) -> torch.Tensor:
        cond: dict[str, Any] = {}
        if prompts is not None:
            cond["prompts"] = list(prompts[start:stop])
        if labels is not None:
            cond["labels"] = list(labels[start:stop])
        part = settings.replace(seed=settings.seed + start, num=stop - start)
        return generate(model, part, **cond)

    return run_batched(run, settings.num, batch, progress=progress, desc=desc)


def prompt_conditioning(model: LoadedModel, prompts: list[str]) -> dict[str, list]:
    """generate's per-image conditioning for prompts: text models take them as they are, class
    models the class each names (``labels_from_prompt``), unconditional models nothing."""
    if model.conditioning == "text":
        return {"prompts": prompts}
    if model.conditioning == "class":
        return {"labels": [labels_from_prompt(p, model.class_names) for p in prompts]}
    return {}
