"""Layouts for regional prompting: which prompt draws which box of the image.

A layout is a list of `Region`s, each a prompt and a box. `guidance.RegionalDenoiser` denoises
every box under its own prompt. Regions come from the user (`generate --region`) or from a
planner that reads the prompt (`--layout shapes`, the default of the embedded model), as the
layout stage of LLM-grounded diffusion (Lian et al. 2024) with a rule-based reader in place of
the language model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

LAYOUTS = ("none", "shapes")
# how far a box reaches past the drawn extent of its object (fraction of the image side)
_MARGIN = 0.05
# background named in every region prompt when the prompt names none: the dataset's neutral
_DEFAULT_BACKGROUND = "gray"


@dataclass(frozen=True)
class Region:
    """`prompt` draws inside `box` = (x0, y0, x1, y1), fractions of the image side, origin at
    the top left."""

    prompt: str
    box: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise UserError(f"a region box is X0 Y0 X1 Y1 with 0 <= X0 < X1 <= 1, got {self.box}")
        if not self.prompt.strip():
            raise UserError("a region needs a prompt")

    def weight(self, height: int, width: int) -> torch.Tensor:
        """(height, width) map, 1 on the grid cells whose centre lies in the box, else 0."""
        x0, y0, x1, y1 = self.box
        ys = (torch.arange(height) + 0.5) / height
        xs = (torch.arange(width) + 0.5) / width
        rows = (ys >= y0) & (ys <= y1)
        cols = (xs >= x0) & (xs <= x1)
        return (rows[:, None] & cols[None, :]).float()

    def to_json(self) -> list:
        return [self.prompt, *self.box]

    @classmethod
    def from_json(cls, value: list) -> Region:
        prompt, *box = value
        return cls(str(prompt), tuple(float(v) for v in box))  # type: ignore[arg-type]


def plan_layout(name: str, prompt: str) -> list[Region]:
    """The regions planner `name` reads from `prompt`; [] where it has none to offer."""
    if name == "none":
        return []
    if name == "shapes":
        return shapes_layout(prompt)
    raise UserError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")


def _place_pair(relation: str | None, known: list[int | None]) -> tuple[int, int] | None:
    """Cells for two objects: the stated ones kept, the others chosen so that the shapes
    captioner would write `relation` for them ("and": neither row nor column shared), as far
    apart as possible (then nearest the centre column / row)."""
    from ..training.shapes import cell_relation

    def key(pair: tuple[int, int]) -> tuple[int, int]:
        (r0, k0), (r1, k1) = divmod(pair[0], 3), divmod(pair[1], 3)
        apart = abs(r0 - r1) + abs(k0 - k1)
        off_centre = abs(r0 - 1) + abs(k0 - 1) + abs(r1 - 1) + abs(k1 - 1)
        return (-apart, off_centre)

    pairs = [
        (c0, c1)
        for c0 in range(9)
        for c1 in range(9)
        if c0 != c1
        and known[0] in (None, c0)
        and known[1] in (None, c1)
        and cell_relation(c0, c1) == (relation or "and")
    ]
    return min(pairs, key=key) if pairs else None


def shapes_layout(prompt: str) -> list[Region]:
    """One region per object of a prompt in the shapes grammar, when it names two or more.

    Each region prompt is the canonical one-object caption ("a small red circle in the top left
    on a blue background"), the background repeated in every region (gray when the prompt
    names none, so the regions agree outside the boxes). A box is the object's 3x3 grid cell
    widened to the object's size (large when not stated) plus a margin. Unstated positions of
    two objects are chosen to fit their relation ("above": same column). Returns [] for one
    object, for prompts the shapes reader finds no objects in, for an object without a shape
    ("a red and a blue square"), and for layouts it cannot place (two objects in one cell,
    three with unstated positions).
    """
    from ..training.shapes import POSITIONS, SIZES, canonical_caption, parse_prompt

    parsed = parse_prompt(prompt)
    objects = [dict(o) for o in parsed["objects"]]
    if len(objects) < 2 or not all(o.get("shape") for o in objects):
        return []
    cells = [POSITIONS.index(o["position"]) if o.get("position") else None for o in objects]
    if None in cells:
        if len(objects) != 2:
            return []
        placed = _place_pair(parsed["relation"], cells)
        if placed is None:
            return []
        cells = list(placed)
    if len(set(cells)) != len(cells):
        return []
    background = parsed["background"] or _DEFAULT_BACKGROUND
    regions = []
    for o, cell in zip(objects, cells, strict=True):
        o["position"] = POSITIONS[cell]
        row, col = divmod(cell, 3)
        cx, cy = (2 * col + 1) / 6, (2 * row + 1) / 6
        reach = SIZES[o.get("size") or "large"] / 2 + _MARGIN
        box = (max(cx - reach, 0.0), max(cy - reach, 0.0), min(cx + reach, 1.0),
               min(cy + reach, 1.0))  # fmt: skip
        text = canonical_caption({"objects": [o], "background": background})
        regions.append(Region(text, box))
    return regions


def region_conditioning(
    encoder, regions: list[list[Region]], grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """`RegionalDenoiser`'s cond tensors for per-image region lists (padded to the longest
    list with zero weights): `region_context` (B, K, T, D), `region_context_mask` (B, K, T),
    `region_weight` (B, K, H, W) on the denoiser's `grid`."""
    k_max = max(len(r) for r in regions)
    texts = sorted({r.prompt for rs in regions for r in rs})
    states, masks = encoder.encode(texts)
    index = {t: i for i, t in enumerate(texts)}
    b = len(regions)
    context = states.new_zeros(b, k_max, *states.shape[1:])
    mask = None if masks is None else masks.new_zeros(b, k_max, *masks.shape[1:])
    weight = torch.zeros(b, k_max, *grid)
    for i, rs in enumerate(regions):
        for k, r in enumerate(rs):
            context[i, k] = states[index[r.prompt]]
            if mask is not None:
                mask[i, k] = masks[index[r.prompt]]
            weight[i, k] = r.weight(*grid)
    out = {"region_context": context, "region_weight": weight}
    if mask is not None:
        out["region_context_mask"] = mask
    return out
