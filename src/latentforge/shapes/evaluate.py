"""Score generated ``shapes`` images against their prompts, with no learned parts.

``analyse`` reads an image back into a record like ``shapes_record``'s (background, objects with
colour / shape / size / 3x3 position, and the relation of a pair); ``matches`` compares it with
what a prompt states (``parse_prompt``); ``evaluate_prompts`` generates for a prompt list and
reports prompt- and attribute-level accuracy.

How an image is read (the renderer draws flat palette colours, anti-aliased edges, objects that
never touch and corners that stay background):

1. Background: the most common nearest ``BACKGROUND_COLOURS`` entry over the border pixels.
2. Unmixing: every pixel p is explained as ``b + alpha (c - b)``, a blend of the background b
   and one palette colour c (least squares alpha, clipped to [0, 1]); the colour with the least
   residual wins. An anti-aliased edge is then its object's colour at partial coverage, not a
   third colour (red over yellow would otherwise read as orange).
3. Objects: connected components (4-neighbour) of alpha > 0.5, tiny ones dropped; colour by a
   coverage-weighted vote; area and centroid from the coverage alpha (sub-pixel exact).
4. Shape: each of the four shapes is rendered (the dataset's own renderer) at the measured
   centroid with the radius that gives the measured area; the template with the least L1
   difference to the coverage map wins. The dataset's shapes are axis-aligned and upright, so
   this is a fixed, four-way template match.
5. Size from that radius (threshold halfway between the dataset's small and large radii),
   position from the centroid's grid cell, relation of a pair as the captioner defines it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ..errors import UserError
from ..io.model_folder import LoadedModel
from ..metrics.batching import generate_batched, prompt_conditioning
from ..pipelines.settings import SampleSettings
from .scenes import (
    BACKGROUND_COLOURS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    canonical_caption,
    cell_relation,
    is_held_out,
    parse_prompt,
    render_shapes,
    shapes_record,
)

OBJECT_ATTRIBUTES = ("colour", "shape", "size", "position")
ATTRIBUTES = ("background", *OBJECT_ATTRIBUTES, "relation", "count")
PROMPT_SETS = {"shapes-seen": "shapes-seen.txt", "shapes-heldout": "shapes-heldout.txt"}

# Area / radius^2 of each shape as the renderer draws it (radius = circumradius).
_AREA_PER_R2 = {
    "circle": np.pi,
    "square": (2 * 0.86) ** 2,  # half-side 0.86 r (shapes._SQUARE_HALF)
    "triangle": 3 * np.sqrt(3) / 4,  # equilateral, circumradius r
    "star": 5 * 0.45 * np.sin(np.radians(36)),  # 10 triangles, inner radius 0.45 r
}
# Halfway (geometric mean) between the dataset's small and large radii, as a fraction of the side.
_SIZE_THRESHOLD = float(np.sqrt(SIZES["small"] * SIZES["large"]) / 2)
_MIN_AREA = 0.004  # components below this fraction of the image are noise, not objects
_MIN_PEAK = 0.75  # ... and those without one pixel at least this covered
_MAX_OBJECTS = 8  # only the largest objects take part in prompt matching
_BLURS = (0.0, 0.6, 1.2)  # template blurs (pixels), for soft-edged generated images

_BG_NAMES = list(BACKGROUND_COLOURS)
_BG_RGB = np.array([BACKGROUND_COLOURS[n] for n in _BG_NAMES], dtype=np.float64)  # (9, 3)
_OBJ_NAMES = list(PALETTE)
_OBJ_RGB = np.array([PALETTE[n] for n in _OBJ_NAMES], dtype=np.float64)  # (8, 3)
_FOUR = ndimage.generate_binary_structure(2, 1)
_EIGHT = ndimage.generate_binary_structure(2, 2)


# ---------------------------------------------------------------- analysis


def _to_rgb_array(image: torch.Tensor | Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from a (C, H, W) tensor in [-1, 1], a PIL image or an array."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    elif isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        arr = ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).double().numpy()  # (H, W, 3)
    else:
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1] or arr.shape[0] < 8:
        raise ValueError(f"expected a square image of side >= 8, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _background(rgb: np.ndarray) -> tuple[str, np.ndarray]:
    """Background name (mode over the border) and its measured colour (median of those pixels)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (P, 3)
    nearest = ((border[:, None] - _BG_RGB[None]) ** 2).sum(-1).argmin(1)  # (P,)
    k = int(np.bincount(nearest, minlength=len(_BG_NAMES)).argmax())
    return _BG_NAMES[k], np.median(border[nearest == k], axis=0)


def _unmix(rgb: np.ndarray, bg: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per pixel and candidate colour c: coverage alpha of p = bg + alpha (c - bg), and residual.

    Returns alpha and residual, both (H, W, K).
    """
    d = colours - bg  # (K, 3)
    p = rgb - bg  # (H, W, 3)
    dd = (d * d).sum(1)  # (K,)
    pd = p @ d.T  # (H, W, K)
    alpha = np.clip(pd / np.maximum(dd, 1e-6), 0, 1)
    # |p - alpha d|^2 expanded, without an (H, W, K, 3) temporary
    resid2 = (p * p).sum(-1, keepdims=True) - 2 * alpha * pd + alpha**2 * dd
    return alpha, np.sqrt(np.maximum(resid2, 0))


def _template(shape: str, cx: float, cy: float, radius: float, side: int) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of one shape drawn by the dataset's renderer."""
    record = {
        "objects": [{"shape": shape, "colour": "white", "cx": cx, "cy": cy, "radius": radius}],
        "background": "black",
        "resolution": side,
    }
    lo, hi = PALETTE["black"][0], PALETTE["white"][0]
    red = np.asarray(render_shapes(record), dtype=np.float64)[..., 0]  # (H, W)
    return (red - lo) / (hi - lo)


def _cell(cx: float, cy: float, side: int) -> int:
    col = min(max(int(3 * cx / side), 0), 2)
    row = min(max(int(3 * cy / side), 0), 2)
    return 3 * row + col


def _read_object(
    alpha: np.ndarray, best: np.ndarray, a_best: np.ndarray, labels: np.ndarray, k: int
) -> dict[str, Any] | None:
    """Colour index, shape, centre, radius and area of component ``k`` (None for noise)."""
    side = labels.shape[0]
    own = labels == k
    # Colour: coverage-weighted vote; squaring favours the object's pure interior over its edge.
    votes = np.bincount(best[own], weights=a_best[own] ** 2, minlength=alpha.shape[-1])
    c = int(votes.argmax())
    # Coverage of that colour over the component and its 2-pixel rim (edges below alpha 0.5),
    # never over another component.
    window = ndimage.binary_dilation(own, _EIGHT, iterations=2) & ((labels == 0) | own)
    cover = np.where(window, alpha[..., c], 0.0)  # (H, W)
    # Noise blobs are small and nowhere solid; every real object has a solid core.
    if cover[own].sum() < _MIN_AREA * side * side or cover[own].max() < _MIN_PEAK:
        return None
    # Work on a square patch around the window, with room for a template a bit larger.
    rows, cols = np.nonzero(window)
    pad = 2 + side // 16
    y0, x0 = int(rows.min()) - pad, int(cols.min()) - pad
    n = int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 2 * pad + 1
    patch = np.pad(cover, n)[y0 + n : y0 + 2 * n, x0 + n : x0 + 2 * n]  # (n, n), 0 outside
    area = float(patch.sum())
    ys, xs = np.mgrid[0:n, 0:n] + 0.5  # pixel j spans [j, j + 1)
    cx, cy = float((patch * xs).sum() / area), float((patch * ys).sum() / area)
    misfit = {}
    for shape in SHAPES:
        template = _template(shape, cx, cy, float(np.sqrt(area / _AREA_PER_R2[shape])), n)
        # Generated images are softer than the renderer: the least misfit over a few blurs.
        blurred = (ndimage.gaussian_filter(template, s) if s else template for s in _BLURS)
        misfit[shape] = min(float(np.abs(patch - t).sum()) for t in blurred) / area
    shape = min(misfit, key=misfit.get)
    return {
        "colour": c,
        "shape": shape,
        "cx": cx + x0,
        "cy": cy + y0,
        "radius": float(np.sqrt(area / _AREA_PER_R2[shape])),
        "area": area,
        "fit_error": misfit[shape],
    }


def analyse(image: torch.Tensor | Image.Image | np.ndarray) -> dict[str, Any]:
    """Read a ``shapes`` image back into a record like ``shapes_record`` returns.

    ``image``: a (3, H, W) tensor in [-1, 1] (one channel is repeated), a PIL image or an
    (H, W, 3) 0..255 array; square. Returns ``{"objects": [...], "background", "relation",
    "caption", "resolution"}``; objects in reading order (by grid cell, then x) with ``shape``,
    ``colour``, ``size``, ``position``, and the measured ``cx``, ``cy``, ``radius`` (pixels),
    ``area`` (pixels, sub-pixel coverage) and ``fit_error`` (L1 template misfit / area).
    ``relation`` (object 0 relative to object 1) is set only when exactly two objects are found.
    """
    rgb = _to_rgb_array(image)
    side = rgb.shape[0]
    bg_name, bg = _background(rgb)
    keep = [i for i, n in enumerate(_OBJ_NAMES) if n != bg_name]
    alpha, resid = _unmix(rgb, bg, _OBJ_RGB[keep])
    best = resid.argmin(-1)  # (H, W)
    # Foreground where the blend is mostly object, or the nearest plain colour is not the
    # background: the second keeps a noisy orange pixel on yellow (which also reads as 60% red)
    # inside its object. Objects never have holes.
    plain = np.concatenate([bg[None], _OBJ_RGB[keep]])  # (1 + K, 3): measured background first
    nearest = ((rgb[:, :, None] - plain) ** 2).sum(-1).argmin(-1)  # (H, W)
    a_best = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # (H, W)
    fg = ndimage.binary_fill_holes((a_best > 0.5) | (nearest > 0))
    labels, n = ndimage.label(fg, _FOUR)
    objects = []
    for k in range(1, n + 1):
        obj = _read_object(alpha, best, a_best, labels, k)
        if obj is None:
            continue
        radius, cx, cy = obj["radius"], obj["cx"], obj["cy"]
        objects.append({
            "shape": obj["shape"],
            "colour": _OBJ_NAMES[keep[obj["colour"]]],
            "size": "small" if radius / side < _SIZE_THRESHOLD else "large",
            "position": POSITIONS[_cell(cx, cy, side)],
            **{key: obj[key] for key in ("cx", "cy", "radius", "area", "fit_error")},
        })  # fmt: skip
    objects.sort(key=lambda o: (POSITIONS.index(o["position"]), o["cx"], o["cy"]))
    relation = None
    if len(objects) == 2:
        cells = [POSITIONS.index(o["position"]) for o in objects]
        relation = cell_relation(*cells)
    record = {"objects": objects, "background": bg_name, "relation": relation, "resolution": side}
    record["caption"] = canonical_caption(record) if objects else f"a {bg_name} background"
    return record


# ---------------------------------------------------------------- prompt matching


def _assignments(n_want: int, n_found: int) -> list[tuple[int | None, ...]]:
    """Every injective map of the prompt's objects onto the found ones (None: not found),
    in a fixed order; beyond three prompt objects only the one in prompt order."""
    if n_want > 3:
        return [tuple(i if i < n_found else None for i in range(n_want))]
    slots: list[int | None] = [*range(n_found), *([None] * n_want)]
    return sorted(
        set(itertools.permutations(slots, n_want)),
        key=lambda a: [n_found if i is None else i for i in a],
    )


def matches(
    prompt: str | dict[str, Any], analysed: dict[str, Any], *, count: bool = True
) -> dict[str, bool]:
    """Which of the attributes the prompt states the analysed image has.

    ``prompt`` is text (read by ``parse_prompt``) or a (partial) record. Keys, only where the
    prompt states them: ``background``; ``colour``, ``shape``, ``size``, ``position`` (true
    when every prompt object that states it agrees with the found object matched to it);
    ``relation``; and ``count`` (as many objects found as the prompt describes; off with
    ``count=False``). Prompt objects are matched to found objects by the assignment that
    agrees on the most attributes. A relation is read from the grid cells as the dataset's
    captioner writes it ("above": same column, higher row; "left of": same row); "and" only
    asks that both objects are found.
    """
    want = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    out: dict[str, bool] = {}
    if want.get("background"):
        out["background"] = analysed["background"] == want["background"]
    wanted = list(want.get("objects") or [])
    if not wanted:
        return out
    # the largest found objects take part in matching; count sees them all
    found = sorted(analysed["objects"], key=lambda o: -o.get("area", 0.0))[:_MAX_OBJECTS]
    relation = want.get("relation") if len(wanted) >= 2 else None
    scored = []
    for assign in _assignments(len(wanted), len(found)):
        checks: dict[str, list[bool]] = {}
        for w, a in zip(wanted, assign, strict=True):
            for attr in OBJECT_ATTRIBUTES:
                if w.get(attr):
                    checks.setdefault(attr, []).append(a is not None and found[a][attr] == w[attr])
        if relation:
            a0, a1 = assign[0], assign[1]
            ok = a0 is not None and a1 is not None
            if ok and relation != "and":
                cells = [POSITIONS.index(found[a]["position"]) for a in (a0, a1)]
                ok = cell_relation(*cells) == relation
            checks["relation"] = [ok]
        scored.append((sum(sum(v) for v in checks.values()), checks))
    best = max(scored, key=lambda sc: sc[0])[1]  # the first of the best
    out.update({attr: all(v) for attr, v in best.items()})
    if count:
        out["count"] = len(analysed["objects"]) == len(wanted)
    return out


def prompt_hits(images: torch.Tensor, captions: Sequence[str]) -> list[bool | None]:
    """For each image, whether it shows every attribute its caption states (``matches``);
    None where the caption states nothing checkable. The trilemma's prompt scorer."""
    hits: list[bool | None] = []
    for image, caption in zip(images, captions, strict=True):
        want = parse_prompt(caption)
        hits.append(all(matches(want, analyse(image)).values()) if states_anything(want) else None)
    return hits


def states_anything(parsed: dict[str, Any]) -> bool:
    """True if a parsed prompt states something ``matches`` can check."""
    return bool(parsed.get("background") or any(parsed.get("objects") or []))


# ---------------------------------------------------------------- prompt sets

PROMPT_SEED = 20_240  # a stream apart from training (seed 0): new scenes, seen compositions


def make_prompts(split: str, n: int = 100, *, seed: int = PROMPT_SEED) -> list[str]:
    """``n`` distinct canonical captions of dataset scenes, deterministically.

    ``split="seen"``: no object is a HELD_OUT (colour, shape) pair (every composition the
    default text model trains on); ``"heldout"``: at least one object is.
    """
    if split not in ("seen", "heldout"):
        raise ValueError(f"unknown prompt split {split!r}; choose 'seen' or 'heldout'")

    def exclude(record: dict) -> bool:
        return is_held_out(record) != (split == "heldout")

    prompts: dict[str, None] = {}
    index = 0
    while len(prompts) < n:
        prompts.setdefault(shapes_record(index, seed, exclude=exclude)["caption"])
        index += 1
    return list(prompts)


def prompt_set_path(name: str) -> Path:
    """The packaged file of a named prompt set (``shapes-seen``, ``shapes-heldout``)."""
    return Path(str(resources.files("latentforge") / "assets" / "prompts" / PROMPT_SETS[name]))


def write_prompt_sets(folder: str | Path | None = None) -> list[Path]:
    """(Re)write the packaged prompt files from ``make_prompts``; returns their paths."""
    written = []
    for name, split in (("shapes-seen", "seen"), ("shapes-heldout", "heldout")):
        path = prompt_set_path(name) if folder is None else Path(folder) / PROMPT_SETS[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(make_prompts(split)) + "\n", encoding="utf-8")
        written.append(path)
    return written


def load_prompts(source: str | Path) -> list[str]:
    """Prompts from a text file (one a line; blank lines and ``#`` comments skipped) or a named
    packaged set (``shapes-seen``, ``shapes-heldout``)."""
    path = prompt_set_path(str(source)) if str(source) in PROMPT_SETS else Path(source)
    if not path.is_file():
        named = ", ".join(sorted(PROMPT_SETS))
        raise UserError(f"prompt file not found: {source} (or name a packaged set: {named})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable text file ({type(e).__name__})") from None
    prompts = [s for line in lines if (s := line.strip()) and not s.startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts (one a line)")
    return prompts


# ---------------------------------------------------------------- evaluation


def _mean(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def evaluate_prompts(
    model: LoadedModel,
    prompts: Sequence[str],
    settings: SampleSettings | None = None,
    *,
    per_prompt: int = 4,
    batch: int = 64,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Generate ``per_prompt`` images for every prompt and score them with ``analyse``.

    settings / keyword overrides: as for ``generate`` (seed, sampler, steps: 20 unless given,
    guidance, guidance_interval, layout, bf16); unset ones are the model's defaults, and the
    resolved values are recorded in ``settings``.

    Image k of prompt i uses seed ``seed + i * per_prompt + k``. Returns ``prompt_accuracy``
    (fraction of images with every stated attribute right), ``attribute_accuracy`` (per
    attribute, over the images whose prompt states it), ``images_per_s`` (sampling only),
    ``n`` (images), ``prompt_accuracy_by_split`` (``seen`` / ``heldout`` prompts, as present),
    ``prompt_accuracy_by_objects`` (prompts naming one object / two objects, as present),
    ``settings`` and ``per_prompt`` (``prompt``, ``heldout``, ``accuracy``,
    ``attribute_accuracy``, ``found``: the canonical caption of what each image shows).
    """
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompts to evaluate")
    if per_prompt < 1:
        raise UserError(f"per_prompt must be >= 1, got {per_prompt}")
    parsed = [parse_prompt(p) for p in prompts]
    for p, want in zip(prompts, parsed, strict=True):
        if not states_anything(want):
            raise UserError(f"prompt {p!r} states no colour, shape, size, position or background")
    per_image = [p for p in prompts for _ in range(per_prompt)]
    s = SampleSettings.build(settings or SampleSettings(steps=20), **overrides)
    s = s.replace(num=len(per_image)).resolve(model)
    cond = prompt_conditioning(model, per_image)
    images, seconds = generate_batched(
        model, s, **cond, batch=batch, progress=progress, desc="eval prompts"
    )

    rows, correct, by_attr = [], [], {a: [] for a in ATTRIBUTES}
    by_split: dict[str, list[bool]] = {}
    by_objects: dict[str, list[bool]] = {}
    for i, (prompt, want) in enumerate(zip(prompts, parsed, strict=True)):
        found, ok, attrs = [], [], {}
        for image in images[i * per_prompt : (i + 1) * per_prompt]:
            analysed = analyse(image)
            m = matches(want, analysed)
            found.append(analysed["caption"])
            ok.append(all(m.values()))
            for attr, v in m.items():
                attrs.setdefault(attr, []).append(v)
                by_attr[attr].append(v)
        split = "heldout" if is_held_out(want) else "seen"
        by_split.setdefault(split, []).extend(ok)
        by_objects.setdefault(str(len(want["objects"])), []).extend(ok)
        correct.extend(ok)
        rows.append({
            "prompt": prompt, "heldout": split == "heldout", "accuracy": _mean(ok),
            "attribute_accuracy": {a: _mean(v) for a, v in attrs.items()}, "found": found,
        })  # fmt: skip
    n = len(per_image)
    return {
        "prompt_accuracy": _mean(correct),
        "attribute_accuracy": {a: _mean(v) for a, v in by_attr.items() if v},
        "prompt_accuracy_by_split": {s: _mean(v) for s, v in sorted(by_split.items())},
        "prompt_accuracy_by_objects": {k: _mean(v) for k, v in sorted(by_objects.items())},
        "images_per_s": n / max(seconds, 1e-9),
        "n": n,
        "n_prompts": len(prompts),
        "settings": dict(
            per_prompt=per_prompt,
            seed=s.seed,
            sampler=s.sampler,
            steps=s.steps,
            guidance=s.guidance,
            guidance_interval=list(s.guidance_interval),
            layout=s.layout,
            bf16=s.bf16,
        ),
        "per_prompt": rows,
    }
