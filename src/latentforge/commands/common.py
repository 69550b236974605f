"""Helpers more than one command module needs (reading --label, writing results), kept here so
that the command modules never import one another."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    import torch


def parse_label(label: str, names: list[str], num_classes: int) -> int:
    """--label as a class index: a class name of the model, or an index below its class count."""
    if not num_classes:
        raise UserError("--label needs a class-conditional model; this one has no classes")
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < num_classes:
        return int(label)
    raise UserError(f"unknown label {label!r}; choose one of {names or list(range(num_classes))}")


def save_images(images: torch.Tensor, out: str, **meta: Any) -> None:
    """One image as itself (so edits chain), several as a grid; parameters in the PNG text."""
    from ..io.images import save_grid, save_png

    if len(images) == 1:
        save_png(images[0], out, meta)
    else:
        save_grid(images, out, **meta)
