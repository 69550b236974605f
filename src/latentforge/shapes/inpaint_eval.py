"""Object inpainting on held-out shapes scenes (`latentforge eval inpaint`, issue 6).

The protocol, per scene i of the data spec's stream `data_seed` (default 1; models train on
stream 0, so no scene was a training image), for the first n scenes that qualify:

1. Hole. One object is chosen: object 0, or object 1 when a mask over object 0 would cover
   more than `max_overlap` of object 1's pixels (a scene where both would is skipped and
   counted). The mask (1 = regenerate) is the object's bounding box from the record (centre
   +- radius, the circumradius, which holds every shape) dilated by `dilate` pixels, clipped
   to the image. The image handed to the inpainter has the hole painted with the scene
   without that object (in practice: the background), so nothing of the old object leaks in.
2. Target. `restore`: the scene as it was. `replace` (default): a new object at the same
   centre and radius (same size and position) with a different colour (never the
   background's) and a different shape, chosen by a fixed per-scene RNG; HELD_OUT
   (colour, shape) pairs are avoided when the spec excludes them (`:holdout`). The prompt is
   the target's `canonical_caption`.
3. Inpainting: `pipelines.inpaint.inpaint` (training-free for any model, the dedicated path
   for `--task inpaint` models), image i seeded with `seed + i`.
4. Scoring with `analyse`: a *hole hit* is a found object whose centre lies in the mask and
   whose colour, shape and size are the target object's. Prompt and per-attribute accuracy
   come from `matches(target, analysed)` (count included: a stray extra object fails). The
   same scoring on the ground-truth renders of the targets is reported as the analyser's
   ceiling, and the largest change of an unmasked pixel (0 with exact paste-back).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..io.images import from_pil
from ..io.model_folder import LoadedModel
from ..metrics.batching import prompt_conditioning, run_batched
from ..pipelines.inpaint import inpaint
from ..pipelines.settings import SampleSettings
from .evaluate import ATTRIBUTES, analyse, matches
from .scenes import COLOURS, HELD_OUT, SHAPES, canonical_caption, render_shapes

MODES = ("replace", "restore")
MAX_OVERLAP = 0.2  # the most of the other object's pixels a hole may cover


@dataclass
class InpaintTask:
    """One held-out scene prepared for inpainting."""

    index: int  # scene index in the stream
    object: int  # which object of the record is masked
    record: dict  # the scene as rendered
    target: dict  # the scene the prompt asks for
    prompt: str  # canonical_caption(target)
    mask: torch.Tensor  # (H, W) bool, True = regenerate
    image: torch.Tensor  # (3, H, W) in [-1, 1]: the scene with the hole painted over


def default_dilation(resolution: int) -> int:
    """Pixels the hole reaches beyond the object's box: 2 at 64 px, 1 at 32 px and below."""
    return max(1, round(resolution / 32))


def box_mask(obj: dict, resolution: int, dilate: int) -> torch.Tensor:
    """(H, W) bool: every pixel whose span [j, j + 1) meets the object's box (centre +- radius,
    record pixel units) grown by `dilate` pixels, clipped to the image."""
    r = obj["radius"] + dilate
    x0, x1 = int(np.floor(obj["cx"] - r)), int(np.ceil(obj["cx"] + r))
    y0, y1 = int(np.floor(obj["cy"] - r)), int(np.ceil(obj["cy"] + r))
    mask = torch.zeros(resolution, resolution, dtype=torch.bool)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


def _with_objects(record: dict, objects: list[dict]) -> dict:
    return {**record, "objects": objects}


def object_pixels(record: dict, k: int) -> torch.Tensor:
    """(H, W) bool: the pixels object k changes from the background (edges included)."""
    alone = np.asarray(render_shapes(_with_objects(record, [record["objects"][k]])), np.int16)
    empty = np.asarray(render_shapes(_with_objects(record, [])), np.int16)
    return torch.from_numpy((alone != empty).any(-1))


def replacement(obj: dict, background: str, key: str, *, avoid_held_out: bool) -> dict:
    """The object at obj's place and size with another colour (not the background's) and
    another shape, drawn by an RNG seeded with `key`."""
    pairs = [
        (c, s)
        for c in COLOURS
        if c not in (obj["colour"], background)
        for s in SHAPES
        if s != obj["shape"] and not (avoid_held_out and (c, s) in HELD_OUT)
    ]
    colour, shape = random.Random(f"latentforge-inpaint-eval:{key}").choice(pairs)
    return {**obj, "colour": colour, "shape": shape}


def _require_shapes(spec: str) -> dict:
    from ..data import parse_spec

    kind, opts = parse_spec(spec)
    if kind != "shapes":
        raise UserError(f"eval inpaint needs a shapes model or --data shapes[:RES]; the data is "
                        f"{spec!r} (pass --model DIR of a model trained on shapes)")  # fmt: skip
    return opts


def inpaint_tasks(
    spec: str,
    n: int,
    *,
    data_seed: int = 1,
    resolution: int | None = None,
    mode: str = "replace",
    dilate: int | None = None,
    max_overlap: float = MAX_OVERLAP,
) -> tuple[list[InpaintTask], int]:
    """The first n qualifying scenes of stream `data_seed` of a shapes spec, as tasks, and how
    many scenes were skipped (both objects too close to mask one alone)."""
    from ..data import load_dataset

    if mode not in MODES:
        raise UserError(f"unknown inpaint eval mode {mode!r}; choose one of {list(MODES)}")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"n must be an integer >= 1, got {n!r}")
    opts = _require_shapes(spec)
    ds = load_dataset(spec, seed=data_seed, resolution=resolution)
    res = ds.resolution
    dilate = default_dilation(res) if dilate is None else dilate
    if dilate < 0:
        raise UserError(f"dilate must be >= 0, got {dilate}")
    tasks: list[InpaintTask] = []
    skipped = 0
    for index in range(len(ds)):
        if len(tasks) == n:
            break
        record = ds.record(index)
        objects = record["objects"]
        chosen = None
        for k in range(len(objects)):
            mask = box_mask(objects[k], res, dilate)
            others = [object_pixels(record, j) for j in range(len(objects)) if j != k]
            if all((p & mask).sum() <= max_overlap * p.sum() for p in others):
                chosen = k, mask
                break
        if chosen is None:
            skipped += 1
            continue
        k, mask = chosen
        new = objects[k]
        if mode == "replace":
            new = replacement(objects[k], record["background"], f"{data_seed}:{index}",
                              avoid_held_out=bool(opts.get("holdout")))  # fmt: skip
        target = _with_objects(record, [new if j == k else o for j, o in enumerate(objects)])
        target["caption"] = canonical_caption(target)
        without = _with_objects(record, [o for j, o in enumerate(objects) if j != k])
        image = torch.where(mask, from_pil(render_shapes(without)), from_pil(render_shapes(record)))
        tasks.append(InpaintTask(index, k, record, target, target["caption"], mask, image))
    if len(tasks) < n:
        raise UserError(f"{spec!r} has only {len(tasks)} usable scenes; asked for {n}")
    return tasks, skipped


def score(image: torch.Tensor, task: InpaintTask) -> dict[str, Any]:
    """Analyse one inpainted image against its task: `hole_hit`, `matches` (per attribute)
    and `found` (the canonical caption of what the analyser sees)."""
    analysed = analyse(image)
    want = task.target["objects"][task.object]
    side = task.mask.shape[-1]
    hit = any(
        task.mask[min(max(int(o["cy"]), 0), side - 1), min(max(int(o["cx"]), 0), side - 1)]
        and all(o[a] == want[a] for a in ("colour", "shape", "size"))
        for o in analysed["objects"]
    )
    return {"hole_hit": bool(hit), "matches": matches(task.target, analysed),
            "found": analysed["caption"]}  # fmt: skip


def _accuracies(scores: list[dict]) -> tuple[float, float, dict[str, float]]:
    """Hole, prompt and per-attribute accuracy (attributes in ATTRIBUTES order)."""
    hole = float(np.mean([s["hole_hit"] for s in scores]))
    prompt = float(np.mean([all(s["matches"].values()) for s in scores]))
    per_attr: dict[str, list[bool]] = {}
    for s in scores:
        for attr, ok in s["matches"].items():
            per_attr.setdefault(attr, []).append(ok)
    attrs = {a: float(np.mean(per_attr[a])) for a in ATTRIBUTES if a in per_attr}
    return hole, prompt, attrs


def evaluate_inpaint(
    model: LoadedModel,
    *,
    n: int = 256,
    mode: str = "replace",
    data: str | None = None,
    data_seed: int = 1,
    settings: SampleSettings | None = None,
    resample: int = 1,
    jump: int = 1,
    feather: int = 0,
    dilate: int | None = None,
    batch: int = 64,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Inpaint a masked object in n held-out shapes scenes and score the holes (see the module
    docstring). Returns `hole_accuracy`, `prompt_accuracy`, `attribute_accuracy`,
    `unmasked_max_abs_diff`, `images_per_s` (inpainting only), `ground_truth` (the same
    scores on the targets' renders), `skipped`, `settings` and `per_scene`. settings / keyword
    overrides: as for `inpaint` (seed, sampler, steps, guidance, guidance_interval, layout);
    scene i is inpainted with seed `seed + i`."""
    task = model.task
    if task not in ("generate", "inpaint"):
        raise UserError(f"{model.path} is a {task!r} model; eval inpaint needs a generating "
                        f"or --task inpaint model")  # fmt: skip
    spec = data or model.meta.data.spec
    _require_shapes(spec)
    if model.output_shape[0] != 3:
        raise UserError(f"{model.path} makes {model.output_shape[0]}-channel images; "
                        f"shapes scenes are RGB")  # fmt: skip
    resolution = model.output_shape[-1]
    dilate = default_dilation(resolution) if dilate is None else dilate
    tasks, skipped = inpaint_tasks(spec, n, data_seed=data_seed, resolution=resolution,
                                   mode=mode, dilate=dilate)  # fmt: skip
    images = torch.stack([t.image for t in tasks])  # (n, 3, H, W)
    masks = torch.stack([t.mask for t in tasks])[:, None].float()  # (n, 1, H, W)
    cond = prompt_conditioning(model, [t.prompt for t in tasks])
    st = SampleSettings.build(settings, **overrides).resolve(model)

    def run(start: int, stop: int) -> torch.Tensor:
        part = {k: v[start:stop] for k, v in cond.items()}
        return inpaint(
            model, images[start:stop], masks[start:stop], st.replace(seed=st.seed + start),
            resample=resample, jump=jump, feather=feather, **part,
        )  # fmt: skip

    out, seconds = run_batched(run, n, batch, progress=progress, desc="inpainting")
    out = out.float().cpu()
    kept = masks == 0  # (n, 1, H, W), broadcast over channels
    diff = (out - images).abs().masked_fill(~kept, 0)
    scores = [score(img, t) for img, t in zip(out, tasks, strict=True)]
    truth = [score(from_pil(render_shapes(t.target)), t) for t in tasks]
    hole, prompt, attrs = _accuracies(scores)
    gt_hole, gt_prompt, _ = _accuracies(truth)
    return {
        "n": n,
        "mode": mode,
        "method": "inpainting model" if task == "inpaint" else "training-free",
        "data": spec,
        "data_seed": data_seed,
        "skipped": skipped,
        "conditioning": sorted(cond) or ["none"],
        "hole_accuracy": hole,
        "prompt_accuracy": prompt,
        "attribute_accuracy": attrs,
        "ground_truth": {"hole_accuracy": gt_hole, "prompt_accuracy": gt_prompt},
        "unmasked_max_abs_diff": float(diff.max()),
        "mask_fraction": round(masks.mean().item(), 4),
        "images_per_s": round(n / max(seconds, 1e-9), 3),
        "settings": dict(
            sampler=st.sampler,
            steps=st.steps,
            guidance=st.guidance,
            guidance_interval=list(st.guidance_interval),
            layout=st.layout,
            resample=resample,
            jump=jump,
            feather=feather,
            dilate=dilate,
            seed=st.seed,
        ),
        "per_scene": [
            dict(
                index=t.index,
                object=t.object,
                prompt=t.prompt,
                found=s["found"],
                hole_hit=s["hole_hit"],
                prompt_ok=all(s["matches"].values()),
            )
            for t, s in zip(tasks, scores, strict=True)
        ],
    }
