"""Hand-drawn sketches of shapes scenes: the training data of the scribble ControlNet.

`draw_sketch` draws the outline of each object of a scene record as a person would with a pen:
dark strokes on light paper, the outline wobbling a little around the true one, the stroke
starting anywhere and overshooting or stopping short of its start, pen width and ink varying.
The scribble preprocessor (`preprocess.py`) turns it into the control image, as it does a
user's own drawing. The shapes dataset gives it to `train controlnet` through the
`ImageDataset.control_source` hook (`control_source` below, wired in `shapes/__init__.py`),
captioned by `sketch_prompt` (colours and shapes, not where or how large: the sketch says that;
the `control_caption` hook).
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from ..data import ImageDataset
from .scenes import DEFAULT_RESOLUTION, _rng, _shape_points, canonical_caption

SKETCH_KINDS = frozenset({"scribble", "sketch"})  # preprocessors the sketches are drawn for
_SUPERSAMPLE = 4
_WOBBLE = 0.06  # outline wobble, a fraction of the object's radius
_SCALE = 0.06  # the drawn outline's size error, relative
_SHIFT = 0.04  # ... and its offset, a fraction of the radius
_SEGMENT = 0.25  # points along the outline, this fraction of the radius apart
_PEN = (0.015, 0.035)  # pen width, a fraction of the image side
SKETCH_SCALE = 2  # sketches are drawn at this many times the data's resolution


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The closed outline of a shape as the renderer draws it, densified to points about
    _SEGMENT * r apart (a circle: a polygon of such points)."""
    if shape == "circle":
        n = max(12, round(2 * math.pi / _SEGMENT))
        return [(cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n))
                for k in range(n)]  # fmt: skip
    corners = _shape_points(shape, cx, cy, r)
    points = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True):
        n = max(1, round(math.hypot(x1 - x0, y1 - y0) / (_SEGMENT * r)))
        points += [(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n) for k in range(n)]
    return points


def _stroke(points: list[tuple[float, float]], rng: random.Random) -> list[tuple[float, float]]:
    """The closed outline as one pen stroke: from a random point round to it again, with an
    overshoot or a gap of up to a few points at the end."""
    start = rng.randrange(len(points))
    points = points[start:] + points[:start]
    end = len(points) + rng.randint(-1, 3)
    return [points[k % len(points)] for k in range(end + 1)]


def draw_sketch(record: dict, resolution: int | None = None, seed: int = 0) -> Image.Image:
    """A hand-drawn outline of every object of `record` (``shapes_record``'s), dark on light,
    RGB of side `resolution` (default: the record's own); `seed` picks the hand."""
    rng = random.Random(seed)
    src = record.get("resolution", DEFAULT_RESOLUTION)
    resolution = resolution or src
    side = resolution * _SUPERSAMPLE
    scale = side / src
    paper = rng.randint(215, 255)
    img = Image.new("RGB", (side, side), (paper,) * 3)
    draw = ImageDraw.Draw(img)
    for o in record["objects"]:
        r = o["radius"] * scale * (1 + rng.uniform(-_SCALE, _SCALE))
        cx = o["cx"] * scale - 0.5 + rng.uniform(-_SHIFT, _SHIFT) * r
        cy = o["cy"] * scale - 0.5 + rng.uniform(-_SHIFT, _SHIFT) * r
        # a smooth wobble: two low harmonics of the angle around the centre
        waves = [(rng.randint(2, 5), rng.uniform(0, 2 * math.pi)) for _ in range(2)]
        amp = [rng.uniform(0, _WOBBLE) * r for _ in waves]
        wobbly = []
        for x, y in _outline(o["shape"], cx, cy, r):
            a = math.atan2(y - cy, x - cx)
            d = sum(m * math.sin(k * a + p) for m, (k, p) in zip(amp, waves, strict=True))
            wobbly.append((x + d * math.cos(a), y + d * math.sin(a)))
        ink = rng.randint(0, 90)
        pen = max(1, round(side * rng.uniform(*_PEN)))
        draw.line(_stroke(wobbly, rng), fill=(ink,) * 3, width=pen, joint="curve")
    return img.reduce(_SUPERSAMPLE)


def sketch_hand(dataset: ImageDataset, i: int) -> int:
    """The hand (`draw_sketch`'s seed) that sketches scene i of shapes data: fixed per scene
    and data seed."""
    return _rng(dataset.seed, dataset._index(i), 0, stream="sketch").getrandbits(63)


def control_source(dataset: ImageDataset, i: int, kind: str) -> Image.Image | None:
    """`ImageDataset.control_source` for shapes data: a hand-drawn sketch of scene i
    (`sketch_hand`) at SKETCH_SCALE times the data's resolution (as a user's drawing is larger
    than the model's images) for the scribble / sketch preprocessors; None (the image itself)
    for the others."""
    if kind not in SKETCH_KINDS:
        return None
    record = dataset.record(i)
    return draw_sketch(record, SKETCH_SCALE * dataset.resolution, sketch_hand(dataset, i))


SHAPE_FREE = 0.5  # share of sketch captions that name no shape (control_caption)


def sketch_prompt(record: dict, shapes: bool = True) -> str:
    """What a prompt says of a sketched scene: colours, shapes and background, not where or how
    large ("a red star and a green circle on a blue background"): the sketch says that.
    shapes=False: "a red shape and a green shape on a blue background"."""
    objects = [{"colour": o["colour"], "shape": o["shape"] if shapes else "shape"}
               for o in record["objects"]]  # fmt: skip
    return canonical_caption({"objects": objects, "background": record["background"]})


def control_caption(dataset: ImageDataset, i: int, kind: str) -> str | None:
    """`ImageDataset.control_caption` for shapes data: `sketch_prompt` of scene i for the
    scribble / sketch preprocessors (a caption naming the place would teach the ControlNet
    nothing the text does not already say); None (its own caption) for the others. A share
    SHAPE_FREE of the scenes (fixed by i) name no shape ("a red shape ..."), so the shape must
    come from the sketch too, and a sketch that disagrees with the prompt's shape wins."""
    if kind not in SKETCH_KINDS:
        return None
    shape_free = random.Random(f"shape-free {i}").random() < SHAPE_FREE
    return sketch_prompt(dataset.record(i), shapes=not shape_free)
