"""The procedural shapes dataset: attribute records, rendering, captions and prompt parsing.

Every image is a pure function of ``(index, seed)``: a record of 1-2 objects (shape, colour,
size, 3x3 grid position) on a plain background is drawn from a private RNG, rendered with
Pillow at 4x supersampling and box-downsampled, so edges are anti-aliased and the same index
gives the same scene at every resolution. Captions come from templates with synonyms; the
canonical template (``canonical_caption``) is the most common and ``parse_prompt`` inverts it
(and the synonym templates), which is what the evaluators use to score generated images.

The dataset class (``ShapesDataset``) and the training rules that read these records are in
``shapes/dataset.py``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw

from ..models.text import IMAGE_NOUNS

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
GRAY: tuple[int, int, int] = (128, 128, 128)
COLOURS: list[str] = list(PALETTE)
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {**PALETTE, "gray": GRAY}
SHAPES: list[str] = ["circle", "square", "triangle", "star"]
SIZES: dict[str, float] = {"small": 0.22, "large": 0.40}  # object extent / image side
POSITIONS: list[str] = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]  # fmt: skip
RELATIONS: list[str] = ["above", "below", "left of", "right of", "and"]

# (colour, shape) pairs that the default text-to-image model never sees in training, so that
# evaluation can measure compositional generalisation on them.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square")}
)

DEFAULT_RESOLUTION = 64
_SUPERSAMPLE = 4
_JITTER = 0.03  # max centre offset from the grid-cell centre, fraction of the side
_SIZE_JITTER = 0.08  # relative radius jitter
_MARGIN = 0.03  # objects keep this far from the image border (corners stay background)
_GAP = 0.03  # min gap between the bounding boxes of two objects
_P_TWO = 0.4  # probability of a two-object scene
_P_GRAY = 0.1  # probability of the gray background
_STAR_INNER = 0.45  # inner/outer radius of the star (0.38 is a regular pentagram)
_SQUARE_HALF = 0.86  # square half-side / radius: about the same area as the circle
_MAX_ATTEMPTS = 1000

# ---------------------------------------------------------------- vocabulary (synonyms)

COLOUR_SYNONYMS: dict[str, list[str]] = {
    "red": ["crimson", "scarlet"],
    "green": ["emerald"],
    "blue": ["azure", "cobalt"],
    "yellow": ["golden", "lemon"],
    "purple": ["violet", "plum"],
    "orange": ["tangerine", "amber"],
    "white": ["ivory", "snowy"],
    "black": ["ebony", "jet-black"],
    "gray": ["grey", "silver"],
}
SHAPE_SYNONYMS: dict[str, list[str]] = {
    "circle": ["disc", "disk"],
    "square": ["box", "block"],
    "triangle": ["triangular shape"],
    "star": ["five-pointed star"],
}
SIZE_SYNONYMS: dict[str, list[str]] = {"small": ["tiny", "little"], "large": ["big", "huge"]}
POSITION_SYNONYMS: dict[str, list[str]] = {
    "top left": ["upper left", "top-left corner"],
    "top": ["top middle", "upper middle"],
    "top right": ["upper right", "top-right corner"],
    "left": ["middle left", "left side"],
    "center": ["middle", "centre"],
    "right": ["middle right", "right side"],
    "bottom left": ["lower left", "bottom-left corner"],
    "bottom": ["bottom middle", "lower middle"],
    "bottom right": ["lower right", "bottom-right corner"],
}
_FILLER_WORDS = {"shape", "five", "pointed"}
RELATION_SYNONYMS: dict[str, list[str]] = {
    "above": ["over", "on top of"],
    "below": ["under", "beneath"],
    "left of": ["to the left of"],
    "right of": ["to the right of"],
    "and": ["and"],
}


def _word_map(table: dict[str, list[str]], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Single lowercase words -> canonical value; multi-word synonyms map by their content
    words ("jet-black" -> jet, black; "five-pointed star" -> star)."""
    out = {k: k for k in table}
    for canonical, synonyms in table.items():
        for synonym in synonyms:
            for word in re.sub(r"[^a-z]+", " ", synonym).split():
                if word not in _FILLER_WORDS:
                    out[word] = canonical
    out.update(extra or {})
    return out


_COLOUR_WORDS = _word_map(COLOUR_SYNONYMS)
_SHAPE_WORDS = _word_map(
    SHAPE_SYNONYMS, {"triangular": "triangle", "circular": "circle", "pentagram": "star"}
)
_SIZE_WORDS = _word_map(SIZE_SYNONYMS)
_VERTICAL = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_HORIZONTAL = {"left": 0, "right": 2}
_CENTRE = {"center", "centre", "middle", "central"}
_BACKGROUND_NOUNS = {"background", "backdrop", "backround"}
# Relation phrases as token tuples, longest first so "to the left of" wins over "left of".
_RELATION_PHRASES: list[tuple[tuple[str, ...], str]] = sorted(
    [
        (("to", "the", "left", "of"), "left of"),
        (("left", "of"), "left of"),
        (("to", "the", "right", "of"), "right of"),
        (("right", "of"), "right of"),
        (("on", "top", "of"), "above"),
        (("above",), "above"),
        (("over",), "above"),
        (("below",), "below"),
        (("under",), "below"),
        (("underneath",), "below"),
        (("beneath",), "below"),
        (("and",), "and"),
        (("with",), "and"),
        (("beside",), "and"),
        (("next", "to"), "and"),
    ],
    key=lambda p: -len(p[0]),
)

# ---------------------------------------------------------------- records


def _rng(seed: int, index: int, attempt: int, stream: str = "record") -> random.Random:
    # String seeds hash through SHA-512: stable across processes and Python versions,
    # independent of PYTHONHASHSEED.
    return random.Random(f"latentforge-shapes:{stream}:{seed}:{index}:{attempt}")


def cell_relation(cell0: int, cell1: int) -> str:
    """Where object 0 is relative to object 1, as captions say it: "and" when the two share
    neither row nor column (or share the cell, which the analyser can read but scenes never
    hold)."""
    (r0, c0), (r1, c1) = divmod(cell0, 3), divmod(cell1, 3)
    if c0 == c1 and r0 != r1:
        return "above" if r0 < r1 else "below"
    if r0 == r1 and c0 != c1:
        return "left of" if c0 < c1 else "right of"
    return "and"


def _draw_object(rng: random.Random, cell: int | None = None, size: str | None = None) -> dict:
    """One object in unit coordinates (fractions of the image side)."""
    shape = rng.choice(SHAPES)
    colour = rng.choice(COLOURS)
    size = size or rng.choice(list(SIZES))
    cell = rng.randrange(9) if cell is None else cell
    jx, jy = rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)
    radius = SIZES[size] / 2 * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
    row, col = divmod(cell, 3)
    lo, hi = radius + _MARGIN, 1 - radius - _MARGIN
    # Clamping keeps large objects inside the image; they stay within their grid third.
    cx = min(max((2 * col + 1) / 6 + jx, lo), hi)
    cy = min(max((2 * row + 1) / 6 + jy, lo), hi)
    return {
        "shape": shape, "colour": colour, "size": size, "position": POSITIONS[cell],
        "cx": cx, "cy": cy, "radius": radius,
    }  # fmt: skip


def _separated(a: dict, b: dict) -> bool:
    """Bounding boxes (half-side = radius, which contains every shape) apart by _GAP."""
    reach = a["radius"] + b["radius"] + _GAP
    return abs(a["cx"] - b["cx"]) >= reach or abs(a["cy"] - b["cy"]) >= reach


def _draw_scene(rng: random.Random) -> dict:
    n_objects = 2 if rng.random() < _P_TWO else 1
    if n_objects == 1:
        objects = [_draw_object(rng)]
    else:
        for _ in range(50):  # rejection: overlapping pairs are redrawn as a whole
            first = _draw_object(rng)
            cell = rng.choice([c for c in range(9) if POSITIONS[c] != first["position"]])
            second = _draw_object(rng, cell)
            if _separated(first, second):
                break
        else:  # practically unreachable; two small objects in opposite corners always fit
            first = _draw_object(rng, 0, "small")
            second = _draw_object(rng, 8, "small")
        objects = [first, second]
    used = {o["colour"] for o in objects}
    if rng.random() < _P_GRAY:
        background = "gray"
    else:
        background = rng.choice([c for c in COLOURS if c not in used])
    relation = None
    if n_objects == 2:
        cells = [POSITIONS.index(o["position"]) for o in objects]
        relation = cell_relation(*cells)
    return {"objects": objects, "background": background, "relation": relation}


def _to_pixels(scene: dict, resolution: int) -> dict:
    objects = [
        {**o, "cx": o["cx"] * resolution, "cy": o["cy"] * resolution,
         "radius": o["radius"] * resolution}
        for o in scene["objects"]
    ]  # fmt: skip
    record = {**scene, "objects": objects, "resolution": resolution}
    record["caption"] = canonical_caption(record)
    return record


def shapes_record(
    index: int,
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    *,
    exclude: Callable[[dict], bool] | None = None,
) -> dict:
    """The attribute record of image ``index`` for ``seed``.

    Returns ``{"objects": [{"shape", "colour", "size", "position", "cx", "cy", "radius"}, ...],
    "background", "relation", "caption", "resolution"}``. ``cx``, ``cy`` and ``radius`` are in
    pixels of a ``resolution``-sized image (continuous coordinates: pixel ``j`` spans
    ``[j, j + 1)``); ``relation`` (None for one object) says where object 0 is relative to
    object 1; ``caption`` is the canonical caption. When ``exclude(record)`` is true the record
    is redrawn from the next RNG stream of the same index, deterministically.
    """
    if index < 0:
        raise ValueError(f"shapes index must be >= 0, got {index}")
    for attempt in range(_MAX_ATTEMPTS):
        record = _to_pixels(_draw_scene(_rng(seed, index, attempt)), resolution)
        if exclude is None or not exclude(record):
            return record
    raise ValueError(f"exclude rejected {_MAX_ATTEMPTS} redraws of shapes image {index}")


def is_held_out(record: dict) -> bool:
    """True if any object in ``record`` (or a parsed prompt) is a HELD_OUT (colour, shape)."""
    return any((o.get("colour"), o.get("shape")) in HELD_OUT for o in record["objects"])


# ---------------------------------------------------------------- rendering


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * _SQUARE_HALF
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, centroid at (cx, cy)
        angles = [-90, 30, 150]
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles
        ]
    if shape == "star":  # five points, alternating outer/inner vertices
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * _STAR_INNER
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_shapes(record: dict, resolution: int | None = None) -> Image.Image:
    """Render ``record`` as an RGB image of side ``resolution`` (default: the record's own).

    Drawn at 4x and box-downsampled, so edges are anti-aliased and flat regions keep their
    exact palette colour.
    """
    src = record.get("resolution", DEFAULT_RESOLUTION)
    resolution = resolution or src
    scale = resolution * _SUPERSAMPLE / src
    side = resolution * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUND_COLOURS[record["background"]])
    draw = ImageDraw.Draw(img)
    for o in record["objects"]:
        # Pillow addresses pixel centres at integer coordinates; ours are at j + 0.5.
        cx, cy, r = o["cx"] * scale - 0.5, o["cy"] * scale - 0.5, o["radius"] * scale
        fill = PALETTE[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(o["shape"], cx, cy, r), fill=fill)
    return img.reduce(_SUPERSAMPLE)


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def canonical_caption(record: dict) -> str:
    """``a <size> <colour> <shape> in the <position> [<relation> a ...] on a <colour> background``.

    Keys missing from ``record`` (e.g. a partial record from ``parse_prompt``) are left out.
    """
    phrases = []
    for o in record["objects"]:
        words = " ".join(o[k] for k in ("size", "colour", "shape") if o.get(k))
        phrase = _with_article(words or "shape")
        if o.get("position"):
            phrase += f" in the {o['position']}"
        phrases.append(phrase)
    text = f" {record.get('relation') or 'and'} ".join(phrases)
    if record.get("background"):
        text += f" on {_with_article(record['background'])} background"
    return text


def _pick(word: str, table: dict[str, list[str]], rng: random.Random, p_plain: float) -> str:
    return word if rng.random() < p_plain else rng.choice(table[word])


def _synonym_object(o: dict, rng: random.Random, position: str | None, size: bool = True) -> str:
    words = [
        _pick(o["colour"], COLOUR_SYNONYMS, rng, 0.4),
        _pick(o["shape"], SHAPE_SYNONYMS, rng, 0.5),
    ]
    if size:
        words.insert(0, _pick(o["size"], SIZE_SYNONYMS, rng, 0.4))
    phrase = _with_article(" ".join(words))
    if position:
        phrase += f" {position} the {_pick(o['position'], POSITION_SYNONYMS, rng, 0.4)}"
    return phrase


def _join(phrases: list[str], relation: str | None, rng: random.Random) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return f" {_pick(relation or 'and', RELATION_SYNONYMS, rng, 0.5)} ".join(phrases)


def sample_caption(record: dict, index: int, seed: int = 0) -> str:
    """The training caption of image ``index``: a template chosen deterministically.

    About 55% canonical (``canonical_caption``), the rest from synonym templates, e.g.
    "a tiny crimson disc at the upper left, azure backdrop", "a blue background with a big
    yellow star above a green square", "a big yellow star above a green square" (position and
    background left out), "small red circle, top left, blue background".
    """
    rng = _rng(seed, index, 0, stream="caption")
    objects, relation, bg = record["objects"], record["relation"], record["background"]
    u = rng.random()
    if u < 0.55:
        return canonical_caption(record)
    if u < 0.70 or (u >= 0.90 and len(objects) == 2):
        at = "at" if len(objects) == 1 or rng.random() < 0.5 else None
        text = _join([_synonym_object(o, rng, at) for o in objects], relation, rng)
        return f"{text}, {_pick(bg, COLOUR_SYNONYMS, rng, 0.4)} backdrop"
    if u < 0.80:
        text = _join([_synonym_object(o, rng, "in") for o in objects], relation, rng)
        return f"{_with_article(_pick(bg, COLOUR_SYNONYMS, rng, 0.5))} background with {text}"
    if u < 0.90:
        keep_size = rng.random() < 0.5
        where = "in" if len(objects) == 1 and rng.random() < 0.5 else None
        phrases = [_synonym_object(o, rng, where, size=keep_size) for o in objects]
        return _join(phrases, relation, rng)
    o = objects[0]
    return f"{o['size']} {o['colour']} {o['shape']}, {o['position']}, {bg} background"


# ---------------------------------------------------------------- prompt parsing


def _tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z]+", " ", str(text).lower()).split()


def _lookup(word: str, table: dict[str, str]) -> str | None:
    if word in table:
        return table[word]
    for suffix in ("es", "s"):  # plurals: "circles", "boxes"
        if word.endswith(suffix) and word[: -len(suffix)] in table:
            return table[word[: -len(suffix)]]
    return None


def _match_relation(tokens: list[str], i: int) -> tuple[str, int] | None:
    for phrase, relation in _RELATION_PHRASES:
        n = len(phrase)
        if tuple(tokens[i : i + n]) == phrase:
            rest = [t for t in tokens[i + n : i + n + 2] if t not in ("the", "a", "an")]
            if relation in ("left of", "right of") and rest[:1] and rest[0] in IMAGE_NOUNS:
                return None  # "in the top left of the image" is a position
            return relation, n
    return None


class _ObjectBuilder:
    def __init__(self) -> None:
        self.attrs: dict[str, str] = {}
        self.row: int | None = None
        self.col: int | None = None
        self.centre = False

    def empty(self) -> bool:
        return not self.attrs and self.row is None and self.col is None and not self.centre

    def finish(self) -> dict[str, str]:
        out = {k: self.attrs[k] for k in ("shape", "colour", "size") if k in self.attrs}
        if self.row is not None or self.col is not None or self.centre:
            row = 1 if self.row is None else self.row
            col = 1 if self.col is None else self.col
            out["position"] = POSITIONS[3 * row + col]
        return out


def parse_prompt(text: str) -> dict[str, Any]:
    """Partial record from a prompt: ``{"objects": [...], "background", "relation"}``.

    Each object holds whichever of shape/colour/size/position the text states (canonical
    names); ``background`` and ``relation`` are None when not stated (``relation`` also when
    fewer than two objects). Understands the canonical caption and the synonym templates;
    case, punctuation and extra spaces do not matter. Never raises: unknown words are ignored.
    """
    tokens = _tokens(text)
    background = None
    keep = [True] * len(tokens)
    for i, tok in enumerate(tokens):  # "<colour> background|backdrop"
        if tok in _BACKGROUND_NOUNS:
            keep[i] = False
            colour = _lookup(tokens[i - 1], _COLOUR_WORDS) if i > 0 else None
            background = background or colour
            j = i - 1
            while colour and j >= 0 and _lookup(tokens[j], _COLOUR_WORDS) == colour:
                keep[j] = False  # all words of the colour ("jet black background")
                j -= 1
    tokens = [t for t, k in zip(tokens, keep, strict=True) if k]

    objects: list[dict[str, str]] = []
    relation: str | None = None
    pending: str | None = None
    cur = _ObjectBuilder()

    def close() -> None:
        nonlocal cur, relation
        if not cur.empty():
            if len(objects) == 1 and relation is None:
                relation = pending
            objects.append(cur.finish())
        cur = _ObjectBuilder()

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if (rel := _match_relation(tokens, i)) is not None:
            close()
            pending = rel[0] if objects else None
            i += rel[1]
            continue
        if colour := _lookup(tok, _COLOUR_WORDS):
            if "shape" in cur.attrs or cur.attrs.get("colour", colour) != colour:
                close()
            cur.attrs["colour"] = colour
        elif size := _lookup(tok, _SIZE_WORDS):
            if "shape" in cur.attrs or cur.attrs.get("size", size) != size:
                close()
            cur.attrs["size"] = size
        elif shape := _lookup(tok, _SHAPE_WORDS):
            if "shape" in cur.attrs:
                close()
            cur.attrs["shape"] = shape
        elif tok in _VERTICAL:
            cur.row = cur.row if cur.row is not None else _VERTICAL[tok]
        elif tok in _HORIZONTAL:
            cur.col = cur.col if cur.col is not None else _HORIZONTAL[tok]
        elif tok in _CENTRE:
            cur.centre = True
        i += 1
    close()
    return {
        "objects": objects,
        "background": background,
        "relation": relation if len(objects) >= 2 else None,
    }
