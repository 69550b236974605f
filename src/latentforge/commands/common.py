"""Helpers more than one command module needs (reading --label, a progress bar over the sampler's
steps, writing results), kept here so that the command modules never import one another."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..io.model_folder import ModelFolder
    from ..sampling import Callback


def parse_label(label: str, names: list[str], num_classes: int) -> int:
    """--label as a class index: a class name of the model, or an index below its class count."""
    if not num_classes:
        raise UserError("--label needs a class-conditional model; this one has no classes")
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < num_classes:
        return int(label)
    raise UserError(f"unknown label {label!r}; choose one of {names or list(range(num_classes))}")


def resolved_steps(model: ModelFolder, steps: int | None) -> int:
    """The sampler steps a pipeline runs for --steps (the model's default when not given), read
    as `SampleSettings.resolve` reads them, so a progress bar's total agrees with the run."""
    from ..pipelines.settings import SampleSettings

    return SampleSettings(steps=steps).resolve(model).steps


def save_images(images: torch.Tensor, out: str, **meta: Any) -> None:
    """One image as itself (so edits chain), several as a grid; parameters in the PNG text."""
    from ..io.images import save_grid, save_png

    if len(images) == 1:
        save_png(images[0], out, meta)
    else:
        save_grid(images, out, **meta)


@contextmanager
def progress(total: int, desc: str, quiet: bool = False) -> Iterator[Callback]:
    """A sampler callback that advances a tqdm bar (steps, it/s, ETA; on stderr) by one per
    call, for the commands that would otherwise sit silent through minutes of sampling.

    Pass what it yields as a pipeline's `callback`; `total` is the number of calls the pipeline
    will make (the sampler's steps, times the runs it makes). The bar opens at the first call,
    so a command that fails before sampling (a bad mask, a wrong --scale) prints its one error
    line and nothing else, and one that samples nothing (strength 0) prints no bar; it is closed
    when the block ends, errors included. A count that overshoots `total` only shows as such
    (tqdm keeps counting). `quiet` yields None: no bar and no per-step call at all.
    """
    if quiet:
        yield None
        return
    from tqdm import tqdm

    bar = None

    def callback(step: int, sigma: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
        bar.update(1)

    try:
        yield callback
    finally:
        if bar is not None:
            bar.close()
