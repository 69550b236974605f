"""Sketch to image on held-out shapes scenes (`latentforge eval control`, issue 25).

The protocol, per scene i of the data spec's stream `data_seed` (default 1; models and their
ControlNets train on stream 0), for the first n scenes:

1. Sketch. A hand-drawn outline of the scene's objects (`sketch.draw_sketch`, the hand the
   dataset gives scene i), through the ControlNet's preprocessor (its folder's `preprocess`).
2. Generation from sketch + prompt, image i seeded with `seed + i`. The prompt names the
   objects' colours and shapes and the background, not where the objects are or how large
   (`sketch_prompt`: "a red star on a blue background"): the sketch says that. The same
   prompts and seeds without the ControlNet are the baseline (position and size then by
   chance); a *wrong sketch* draws object 0 as another shape while the prompt keeps naming
   the scene's own.
3. Scoring with `analyse` and `matches` against the scene's record (for the wrong sketch:
   against the sketched scene, and against the prompt's): per attribute, how often the image
   shows what the sketch (shape, position, size) and the prompt (colour, background) say.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..data import load_dataset
from ..errors import UserError
from ..io.controlnet import default_controlnet, load_controlnet
from ..io.images import from_pil
from ..io.model_folder import LoadedModel
from ..pipelines.control import Control
from ..pipelines.generate import generate
from ..pipelines.settings import SampleSettings
from ..preprocess import preprocess
from .dataset import ShapesDataset
from .evaluate import analyse, matches
from .scenes import SHAPES, render_shapes
from .sketch import SKETCH_SCALE, draw_sketch, sketch_hand, sketch_prompt

ATTRIBUTES = ("shape", "position", "size", "colour", "background")
TARGETS = {"shape": 0.9, "position": 0.95, "colour": 0.9}  # issue 25's


def wrong_scene(record: dict, index: int) -> dict:
    """`record` with object 0 turned into another shape (fixed per scene index)."""
    first = record["objects"][0]
    others = [s for s in SHAPES if s != first["shape"]]
    return {**record, "objects": [{**first, "shape": others[index % len(others)]},
                                  *record["objects"][1:]]}  # fmt: skip


def _rates(images: torch.Tensor, records: list[dict]) -> dict[str, float]:
    """Per attribute (and all of them together), the share of images that show what the
    records say, the object count included."""
    hits: dict[str, list[bool]] = {a: [] for a in (*ATTRIBUTES, "all")}
    for image, record in zip(images, records, strict=True):
        found = matches(record, analyse(image))
        for a in ATTRIBUTES:
            hits[a].append(found[a] and found["count"])
        hits["all"].append(all(found.values()))
    return {a: round(sum(v) / len(v), 4) for a, v in hits.items()}


def evaluate_control(
    model: LoadedModel,
    controlnet: str | Path | None = None,
    *,
    n: int = 64,
    data: str | None = None,
    data_seed: int = 1,
    scale: float = 1.0,
    settings: SampleSettings | None = None,
    batch: int = 16,
    figure: str | Path | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Generate n held-out scenes from their sketches and captions and score them (see the
    module docstring). `controlnet`: a ControlNet folder (None: the model's own,
    `sampling.controlnet`). `figure`: a PNG of the first 8 scenes (sketch, image, baseline,
    wrong sketch and its image). Returns `control`, `baseline` and `wrong_sketch` rates, the
    targets, `images_per_s`, `settings`."""
    from tqdm.auto import tqdm

    path = Path(controlnet) if controlnet else default_controlnet(model.path, model.meta)
    if path is None:
        raise UserError(f"{model.path} names no ControlNet (sampling.controlnet); pass "
                        "--controlnet DIR")  # fmt: skip
    net, meta = load_controlnet(path, device=model.device)
    kind = meta.controlnet.get("preprocess", "none")
    spec = data or model.meta.data.spec
    side = model.output_shape[-1]
    ds = load_dataset(spec, seed=data_seed, resolution=side)
    if not isinstance(ds, ShapesDataset) or model.output_shape[0] != 3:
        raise UserError(f"eval control needs an RGB model and shapes data; the data is "
                        f"{spec!r} (pass --data shapes[:RES])")  # fmt: skip
    if n > len(ds):
        raise UserError(f"--n {n}: {spec!r} has {len(ds)} scenes")
    st = SampleSettings.build(settings, **overrides).resolve(model)
    records = [ds.record(i) for i in range(n)]
    wrong = [wrong_scene(r, i) for i, r in enumerate(records)]
    sketches = {"control": [draw_sketch(r, SKETCH_SCALE * side, sketch_hand(ds, i))
                            for i, r in enumerate(records)]}  # fmt: skip
    sketches["wrong_sketch"] = [draw_sketch(r, SKETCH_SCALE * side, sketch_hand(ds, i))
                                for i, r in enumerate(wrong)]  # fmt: skip
    controls = {k: torch.stack([(from_pil(preprocess(s, kind)) + 1) / 2 for s in v])
                for k, v in sketches.items()}  # fmt: skip
    prompts = [sketch_prompt(r) for r in records]
    runs = {"control": controls["control"], "baseline": None,
            "wrong_sketch": controls["wrong_sketch"]}  # fmt: skip
    images: dict[str, torch.Tensor] = {}
    seconds = 0.0
    with tqdm(total=3 * n, desc="sketch to image", unit="img", disable=not progress) as bar:
        for name, control in runs.items():
            parts = []
            for a in range(0, n, batch):
                b = min(n, a + batch)
                steer = [Control(net, control[a:b], scale=scale)] if control is not None else []
                t0 = time.perf_counter()
                part = st.replace(seed=st.seed + a, num=b - a)
                out = generate(model, part, prompts=prompts[a:b], controls=steer)
                parts.append(out.float().cpu())
                seconds += time.perf_counter() - t0
                bar.update(b - a)
            images[name] = torch.cat(parts)
    wrong_rates = _rates(images["wrong_sketch"], wrong)
    result = {
        "n": n,
        "data": spec,
        "data_seed": data_seed,
        "controlnet": str(path),
        "preprocess": kind,
        "control": _rates(images["control"], records),
        "baseline": _rates(images["baseline"], records),
        "wrong_sketch": {
            "shape_follows_sketch": wrong_rates["shape"],
            "shape_follows_prompt": _rates(images["wrong_sketch"], records)["shape"],
            "position": wrong_rates["position"],
            "colour": wrong_rates["colour"],
        },
        "ground_truth": _rates(torch.stack([from_pil(render_shapes(r)) for r in records]), records),
        "targets": TARGETS,
        "images_per_s": round(3 * n / max(seconds, 1e-9), 3),
        "settings": dict(
            sampler=st.sampler, steps=st.steps, guidance=st.guidance, scale=scale, seed=st.seed
        ),
    }
    if figure:
        _figure(figure, sketches, images, prompts)
    return result


def _figure(path: str | Path, sketches: dict, images: dict, prompts: list[str]) -> None:
    """Columns: scenes; rows: sketch, image, baseline (no sketch), wrong sketch, its image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.images import to_pil

    cols = min(8, len(prompts))
    rows = [
        ("sketch", sketches["control"]),
        ("sketch + prompt", [to_pil(x) for x in images["control"][:cols]]),
        ("prompt alone", [to_pil(x) for x in images["baseline"][:cols]]),
        ("wrong sketch", sketches["wrong_sketch"]),
        ("wrong sketch + prompt", [to_pil(x) for x in images["wrong_sketch"][:cols]]),
    ]
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.75 * len(rows)), squeeze=False)
    for r, (label, row) in enumerate(rows):
        for c, image in enumerate(row[:cols]):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0:
                ax.set_title(prompts[c], fontsize=5, wrap=True)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
