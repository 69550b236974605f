"""The shapes layout planner: regions for regional prompting read from a shapes prompt.

Registered as the "shapes" layout (`pipelines.layout.register_layout`, done when the wing is
imported), the default of text models trained on shapes data. It is the layout stage of
LLM-grounded diffusion (Lian et al. 2024) with the shapes grammar's reader in place of the
language model.
"""

from __future__ import annotations

from ..guidance import Region
from .scenes import POSITIONS, SIZES, canonical_caption, cell_relation, parse_prompt

# how far a box reaches past the drawn extent of its object (fraction of the image side)
_MARGIN = 0.05
# background named in every region prompt when the prompt names none: the dataset's neutral
_DEFAULT_BACKGROUND = "gray"


def _place_pair(relation: str | None, known: list[int | None]) -> tuple[int, int] | None:
    """Cells for two objects: the stated ones kept, the others chosen so that the shapes
    captioner would write `relation` for them ("and": neither row nor column shared), as far
    apart as possible (then nearest the centre column / row)."""

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
