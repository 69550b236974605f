"""The shapes dataset and its training rules.

`ShapesDataset` renders the procedural scenes of `scenes.py`; its attribute records say what
each image holds, which is what the training rules read: `--oversample` (draw images with
such objects more often), `--object-weight` (weigh their cells more in the loss) and
`--region-captions` (caption an image as one of its objects, the other's box left out of the
loss). The generic trainer reaches them through `ImageDataset`'s hooks, never by name.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ..data import DataKind, ImageDataset, parse_res_length_flag
from ..errors import UserError
from ..io.images import from_pil
from . import sketch
from .scenes import (
    BACKGROUND_COLOURS,
    COLOURS,
    DEFAULT_RESOLUTION,
    SHAPES,
    SIZES,
    canonical_caption,
    is_held_out,
    render_shapes,
    sample_caption,
    shapes_record,
)

SHAPES_LENGTH = 100_000


class ShapesDataset(ImageDataset):
    """Procedural captioned shapes; image i is a pure function of (i, seed).

    ``exclude(record) -> bool`` re-draws (deterministically) every scene it rejects, e.g.
    ``exclude=is_held_out`` keeps the HELD_OUT (colour, shape) pairs out of training.
    ``record(i)`` gives the attribute record behind image i (see ``shapes_record``).
    """

    def __init__(
        self,
        resolution: int = DEFAULT_RESOLUTION,
        length: int = SHAPES_LENGTH,
        *,
        seed: int = 0,
        exclude: Callable[[dict], bool] | None = None,
        spec: str | None = None,
    ) -> None:
        super().__init__(spec=spec or f"shapes:{resolution}", resolution=resolution, channels=3)
        if length < 1:
            raise UserError(f"shapes dataset length must be >= 1, got {length}")
        self.length = length
        self.seed = seed
        self.exclude = exclude

    default_layout = "shapes"  # text models trained on shapes plan regions (shapes/layout.py)
    procedural = True
    lists_objects = True

    def __len__(self) -> int:
        return self.length

    def record(self, i: int) -> dict:
        return shapes_record(self._index(i), self.seed, self.resolution, exclude=self.exclude)

    def caption(self, i: int) -> str:
        i = self._index(i)
        return sample_caption(self.record(i), i, self.seed)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        record = self.record(i)
        return {
            "image": from_pil(render_shapes(record, self.resolution)),
            "label": -1,
            "caption": sample_caption(record, i, self.seed),
        }

    def control_source(self, i: int, kind: str) -> Image.Image | None:
        """`train controlnet --control scribble`: a hand-drawn sketch of scene i (sketch.py)."""
        return sketch.control_source(self, i, kind)

    def control_caption(self, i: int, kind: str) -> str | None:
        """The sketched scene's prompt without where or how large (sketch.py)."""
        return sketch.control_caption(self, i, kind)

    def read_back(self, images: torch.Tensor) -> dict | None:
        """Scene accuracy of the analyser (evaluate.py) on round-tripped RGB images, all and by
        object kind: the ceiling a VAE puts on prompt accuracy."""
        if images.shape[1] != 3:
            return None
        from .evaluate import analyse, matches

        hits, by_kind = [], {}
        for i, image in enumerate(images):
            record = self.record(i)
            ok = all(matches(record, analyse(image)).values())
            hits.append(ok)
            for o in record["objects"]:
                by_kind.setdefault(f"{o['size']} {o['shape']}", []).append(ok)
        return {
            "roundtrip_scene_accuracy": round(sum(hits) / len(hits), 4),
            "roundtrip_scene_accuracy_by_object": {
                k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())
            },
        }

    # ----- the training rules' hooks (data.py ImageDataset) -------------------------
    def object_rules(self, rules: tuple[str, ...] | list[str], option: str) -> ObjectRules:
        return parse_oversample(rules, option)

    def sample_weights(self, rules: tuple[str, ...] | list[str]) -> torch.Tensor:
        return sample_weights(self, rules)

    def object_weights(self, rules: ObjectRules, indices: torch.Tensor, side: int) -> torch.Tensor:
        return object_weights(self, rules, indices, side)

    def region_captions(
        self, indices: torch.Tensor, which: torch.Tensor, side: int
    ) -> tuple[list[str | None], torch.Tensor]:
        return region_captions(self, indices, which, side)


# ----- training rules: --oversample, --object-weight, --region-captions --------------------

_ATTRIBUTES = {**dict.fromkeys(SIZES, "size"), **dict.fromkeys(COLOURS, "colour"),
               **dict.fromkeys(SHAPES, "shape")}  # fmt: skip


def parse_oversample(
    rules: tuple[str, ...] | list[str], option: str = "--oversample"
) -> list[tuple[dict[str, str], float]]:
    """``["small star on gray=3"]`` -> ``[({"size": "small", "shape": "star", "background":
    "gray"}, 3.0)]``.

    A rule is ``WORDS [on COLOUR]=FACTOR``: WORDS name one object by its size, colour and/or
    shape (any of them, at most one of each), ``on COLOUR`` the image's background (a palette
    colour or gray); FACTOR > 0 scales how often an image holding such an object is drawn
    (``--oversample``) or how much its pixels weigh in the loss (``--object-weight``). Raises
    UserError, naming ``option``, on anything else.
    """
    parsed = []
    for rule in rules:
        words, sep, factor = str(rule).rpartition("=")
        attrs: dict[str, str] = {}
        head, on, background = f" {words.lower()}".partition(" on ")
        if on:
            background = re.sub(r"^an? |\s+background$", "", background.strip())
            if background in BACKGROUND_COLOURS:
                attrs["background"] = background
            else:
                head = ""  # a bad background: the rule is rejected below
        for word in head.split():
            kind = _ATTRIBUTES.get(word)
            if kind is None or kind in attrs:
                attrs = {}
                break
            attrs[kind] = word
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not sep or not attrs or not value > 0 or value == float("inf"):
            raise UserError(
                f"bad {option} {rule!r}: expected 'WORDS [on COLOUR]=FACTOR', WORDS one "
                f"object's size, colour and/or shape ({', '.join([*SIZES, *COLOURS, *SHAPES])}), "
                f"COLOUR the background (a colour or gray), FACTOR > 0"
            )
        parsed.append((attrs, value))
    return parsed


ObjectRules = list[tuple[dict[str, str], float]]  # parse_oversample's result


def object_rules(
    dataset: ImageDataset, rules: tuple[str, ...] | list[str], option: str
) -> ObjectRules:
    """``option``'s rules parsed (``parse_oversample``), after checking that ``dataset`` is
    shapes data, the only kind whose attribute records say what each image holds."""
    return dataset.object_rules(rules, option)


def _is(record: dict, obj: dict, attrs: dict[str, str]) -> bool:
    """Whether an object of a record has every attribute a rule names (the background is the
    record's)."""
    return all((record if k == "background" else obj)[k] == v for k, v in attrs.items())


def sample_weights(dataset: ImageDataset, rules: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Per-image draw weights (float64, one per dataset index) for ``--oversample`` rules: the
    product of the factors of the rules an object of the image matches (1 when none does).
    Only for ``shapes`` data (``object_rules``)."""
    parsed = object_rules(dataset, rules, "--oversample")
    weights = torch.ones(len(dataset), dtype=torch.float64)
    matched = [0] * len(parsed)
    for i in range(len(dataset)):
        record = dataset.record(i)
        for k, (attrs, factor) in enumerate(parsed):
            if any(_is(record, o, attrs) for o in record["objects"]):
                weights[i] *= factor
                matched[k] += 1
    for rule, count in zip(rules, matched, strict=True):
        if not count:
            warnings.warn(f"--oversample {rule!r} matches no image of {dataset.spec!r} "
                          "(a :holdout spec leaves out the held-out colour/shape pairs)",
                          stacklevel=2)  # fmt: skip
    return weights


def object_weights(
    dataset: ImageDataset, rules: ObjectRules, indices: torch.Tensor, side: int
) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, side, side) for ``--object-weight`` rules (parsed once by
    ``object_rules``) on a side x side grid over images ``indices`` of shapes data: a cell
    weighs the product of the factors of the rules whose object covers it (the object's
    bounding box grown by one cell), 1 elsewhere. Cells are those of the latent grid when
    ``side`` is the latent side."""
    out = torch.ones(len(indices), 1, side, side)
    for b, i in enumerate(indices.tolist()):
        record = dataset.record(int(i))
        for o in record["objects"]:
            factor = math.prod(f for attrs, f in rules if _is(record, o, attrs))
            if factor != 1:
                out[b, 0][_cells(o, record["resolution"], side)] *= factor
    return out


def _cells(obj: dict, resolution: int, side: int) -> torch.Tensor:
    """(side, side) bool: the cells of a side x side grid over the image whose centres lie in
    the object's bounding box (half-side = radius) grown by one cell."""
    centres = (torch.arange(side) + 0.5) / side  # fractions of the image side
    reach = obj["radius"] / resolution + 1 / side
    rows = (centres - obj["cy"] / resolution).abs() <= reach
    cols = (centres - obj["cx"] / resolution).abs() <= reach
    return rows[:, None] & cols[None, :]


def region_captions(
    dataset: ImageDataset, indices: torch.Tensor, which: torch.Tensor, side: int
) -> tuple[list[str | None], torch.Tensor]:
    """Region captions for images ``indices`` of shapes data (``--region-captions``): where
    ``which`` is 0 or 1 and the image holds two objects, the caption of that object alone, as
    regional prompting writes a box's prompt (``shapes/layout.py``: the canonical one-object
    caption with the image's background), and a (B, 1, side, side) loss weight that is 0 on the
    other object's box grown by one cell (1 elsewhere); None and all-ones for the other images.

    At inference every box is denoised under such a prompt while the image also holds the other
    objects. Training on it teaches the U-Net that a one-object caption names what is in its box
    and says nothing about the rest, instead of asking for an image with that object alone.
    """
    captions: list[str | None] = []
    weight = torch.ones(len(indices), 1, side, side)
    for b, (i, k) in enumerate(zip(indices.tolist(), which.tolist(), strict=True)):
        record = dataset.record(int(i))
        objects = record["objects"]
        if k not in (0, 1) or len(objects) != 2:
            captions.append(None)
            continue
        kept, other = objects[k], objects[1 - k]
        captions.append(canonical_caption({"objects": [kept], "background": record["background"]}))
        weight[b, 0][_cells(other, record["resolution"], side)] = 0
    return captions, weight


# ----- the data spec: shapes[:RES][:N][:holdout] ---------------------------------------------
def _parse_shapes(rest: str, spec: str) -> tuple[dict[str, Any], bool]:
    return parse_res_length_flag("shapes", rest, spec, flag="holdout",
                                 resolution=DEFAULT_RESOLUTION)  # fmt: skip


def _build_shapes(opts: dict[str, Any], seed: int, spec: str) -> ShapesDataset:
    exclude = is_held_out if opts.get("holdout") else None
    length = opts.get("length", SHAPES_LENGTH)
    return ShapesDataset(opts["resolution"], length, seed=seed, exclude=exclude, spec=spec)


SHAPES_KIND = DataKind(
    "shapes", "shapes[:RES][:N][:holdout]", (16, 512), _parse_shapes, _build_shapes
)
