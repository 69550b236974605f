"""The LoRA demonstration of docs/lora.md: teach the embedded shapes model a shape it has never
seen (a hexagon, trigger "sks hexagon") from 40 images, and measure it.

`hexagon_scene` draws a hexagon the way the shapes renderer draws its shapes (a one-object scene
of the dataset, its shape swapped, drawn at 4x and box-downsampled); `read_shape` is the
detector: the object's coverage map against each shape's template (the dataset's four, drawn by
its own renderer, and the hexagon) at the measured centre and area, least L1 misfit wins (the
analyser's rule, shapes/evaluate.py, with a fifth template). The test checks the detector on
rendered scenes; `python tests/test_lora_demo.py OUT` runs the demonstration (CPU minutes).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from latentforge.shapes.scenes import (
    BACKGROUND_COLOURS,
    PALETTE,
    SHAPES,
    canonical_caption,
    render_shapes,
    shapes_record,
)

TRIGGER = "sks hexagon"
_SS = 4  # supersampling, as the renderer
_HEX_R = math.sqrt(math.pi / (1.5 * math.sqrt(3)))  # circumradius of the circle's-area hexagon


def _hexagon_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Upright (a vertex on top) like the dataset's triangle and star; area that of radius r's
    circle."""
    return [(cx + _HEX_R * r * math.cos(math.radians(-90 + 60 * k)),
             cy + _HEX_R * r * math.sin(math.radians(-90 + 60 * k))) for k in range(6)]  # fmt: skip


def _draw(record: dict) -> Image.Image:
    """A one-object record whose shape is "hexagon", drawn as `render_shapes` draws."""
    side = record["resolution"] * _SS
    img = Image.new("RGB", (side, side), BACKGROUND_COLOURS[record["background"]])
    o = record["objects"][0]
    points = _hexagon_points(o["cx"] * _SS - 0.5, o["cy"] * _SS - 0.5, o["radius"] * _SS)
    ImageDraw.Draw(img).polygon(points, fill=PALETTE[o["colour"]])
    return img.reduce(_SS)


def one_object_records(n: int, seed: int, resolution: int = 64) -> list[dict]:
    """The first n one-object scenes of the shapes dataset for `seed`."""
    out, i = [], 0
    while len(out) < n:
        record = shapes_record(i, seed, resolution)
        if len(record["objects"]) == 1:
            out.append(record)
        i += 1
    return out


def hexagon_scene(record: dict) -> tuple[Image.Image, str]:
    """(image, caption) of `record` with its object a hexagon, named by the trigger."""
    o = {**record["objects"][0], "shape": "hexagon"}
    record = {**record, "objects": [o]}
    caption = canonical_caption({**record, "objects": [{**o, "shape": TRIGGER}]})
    return _draw(record), caption


def hexagon_folder(folder: Path, n: int, seed: int = 7) -> Path:
    """n hexagon scenes with .txt captions (the folder:PATH convention)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(one_object_records(n, seed)):
        image, caption = hexagon_scene(record)
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


# ----- the detector ------------------------------------------------------------------------------
def _coverage(rgb: np.ndarray) -> np.ndarray | None:
    """The largest object's coverage (H, W) in [0, 1]: each pixel as background + alpha
    (object - background), background the border's median, object the median of what is far
    from it. None when nothing stands out."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, 0)
    far = np.linalg.norm(rgb - bg, axis=-1) > 60
    labels, n = ndimage.label(far)
    if n == 0:
        return None
    k = 1 + int(np.argmax(ndimage.sum(far, labels, range(1, n + 1))))
    obj = np.median(rgb[labels == k], 0)
    d = obj - bg
    alpha = np.clip(((rgb - bg) @ d) / max(float(d @ d), 1e-6), 0, 1)
    window = ndimage.binary_dilation(labels == k, iterations=2)
    return np.where(window, alpha, 0.0)


def _template(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """A shape's coverage (white on black), the dataset's renderer or `_draw` for the hexagon."""
    o = {"shape": shape, "colour": "white", "cx": cx, "cy": cy, "radius": r}
    record = {"objects": [o], "background": "black", "resolution": side}
    image = _draw(record) if shape == "hexagon" else render_shapes(record)
    lo, hi = PALETTE["black"][0], PALETTE["white"][0]
    return (np.asarray(image, dtype=np.float64)[..., 0] - lo) / (hi - lo)


def _area_per_r2() -> dict[str, float]:
    return {s: float(_template(s, 64, 64, 40, 128).sum()) / 40**2 for s in (*SHAPES, "hexagon")}


_AREA = _area_per_r2()


def read_shape(image: torch.Tensor | Image.Image) -> str | None:
    """The shape of the image's largest object among the dataset's four and "hexagon" (None:
    no object)."""
    if isinstance(image, Image.Image):
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        rgb = ((image.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).double().numpy()  # (H, W, 3)
    cover = _coverage(rgb)
    if cover is None or cover.sum() < 4:
        return None
    side, area = cover.shape[0], float(cover.sum())
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    cx, cy = float((cover * xs).sum() / area), float((cover * ys).sum() / area)
    misfit = {}
    for shape, per_r2 in _AREA.items():
        t = _template(shape, cx, cy, math.sqrt(area / per_r2), side)
        # generated edges are softer than rendered ones: the least misfit over a few blurs
        misfit[shape] = min(np.abs(cover - ndimage.gaussian_filter(t, s) if s else cover - t)
                            .sum() for s in (0, 0.7, 1.2))  # fmt: skip
    return min(misfit, key=misfit.get)


def detector_accuracy(n: int = 100, seed: int = 123) -> dict[str, float]:
    """How often `read_shape` names the shape of rendered one-object scenes: the dataset's own
    (a hexagon read there is a false alarm) and the same scenes as hexagons."""
    records = one_object_records(n, seed)
    own = [read_shape(render_shapes(r)) == r["objects"][0]["shape"] for r in records]
    hexes = [read_shape(hexagon_scene(r)[0]) == "hexagon" for r in records]
    false = [read_shape(render_shapes(r)) == "hexagon" for r in records]
    return {"dataset_shapes": float(np.mean(own)), "hexagons": float(np.mean(hexes)),
            "false_hexagons": float(np.mean(false))}  # fmt: skip


def test_detector_reads_rendered_scenes():
    acc = detector_accuracy(60)
    assert acc["hexagons"] >= 0.95 and acc["dataset_shapes"] >= 0.95, acc
    assert acc["false_hexagons"] <= 0.05, acc


# ----- the demonstration -------------------------------------------------------------------------
def concept_rate(model, n: int, seed: int = 1000, word: str = TRIGGER) -> float:
    """Share of images, for n unseen one-object prompts naming `word` as the shape, in which a
    hexagon is read."""
    from latentforge.pipelines.generate import generate

    prompts = [hexagon_scene(r)[1].replace(TRIGGER, word) for r in one_object_records(n, seed)]
    images = torch.cat([generate(model, prompts=[p], num=1, seed=i, layout="none")
                        for i, p in enumerate(prompts)])  # fmt: skip
    return float(np.mean([read_shape(x) == "hexagon" for x in images]))


def seen_accuracy(model, per_prompt: int = 1) -> float:
    """`eval prompts --prompts shapes-seen` (20 steps, the model's defaults)."""
    from latentforge.shapes.evaluate import evaluate_prompts, load_prompts

    return evaluate_prompts(model, load_prompts("shapes-seen"), per_prompt=per_prompt)[
        "prompt_accuracy"
    ]


def demo(
    out: Path, steps: int = 150, images: int = 40, rank: int = 8, n: int = 50, *,
    target: str = "attn",
) -> dict:  # fmt: skip
    """Train the hexagon LoRA into OUT/run and measure, before and after: the concept rate on n
    unseen hexagon prompts, and the accuracy on the 100 seen shapes prompts (one image each)."""
    from latentforge.io.lora import apply_loras, remove_loras
    from latentforge.io.model_folder import load_diffusion_model
    from latentforge.training.lora_train import LORA_FILE, LoraTrainConfig, train_lora

    out.mkdir(parents=True, exist_ok=True)
    data = hexagon_folder(out / "data", images)
    cfg = LoraTrainConfig(data=f"folder:{data}:64", out=str(out / "run"), rank=rank,
                          max_steps=steps, batch_size=8, lr=2e-3, ckpt_every=50,
                          lora_target=target)  # fmt: skip
    cpu, wall = time.process_time(), time.perf_counter()
    assert train_lora(cfg) == 0
    result = {"train_cpu_s": time.process_time() - cpu,
              "train_wall_s": time.perf_counter() - wall, "steps": steps, "images": images,
              "rank": rank, "target": target, "detector": detector_accuracy()}  # fmt: skip
    model = load_diffusion_model(None)
    result["concept_before"] = concept_rate(model, n)
    result["false_alarm_circles"] = concept_rate(model, n, word="circle")
    result["seen_before"] = seen_accuracy(model)
    applied = apply_loras(model, [out / "run" / LORA_FILE])
    result["concept_after"] = concept_rate(model, n)
    result["without_trigger_after"] = concept_rate(model, n, word="hexagon")
    result["seen_after"] = seen_accuracy(model)
    remove_loras(model, applied)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


# ----- the benchmark (docs/lora.md) --------------------------------------------------------------
def bench(rank: int = 32, repeats: int = 3, latent: int = 32) -> dict:
    """An SD-1.5-sized U-Net (random weights) and a random kohya LoRA of `rank` on every Linear
    of its transformers (kohya's default targets): seconds to read and fuse it, to restore, and
    a U-Net step (batch 2, latent x latent: a CFG step) plain, fused, and with the LoRA as
    forward hooks instead."""
    import tempfile

    from latentforge.io.lora import UNET, LoraSpec, lora_layers, save_lora
    from latentforge.models.lora import LoraFactors, LoraNetwork, fuse, restore
    from latentforge.models.presets import unet_preset
    from latentforge.models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(unet_preset("sd15")).eval().requires_grad_(False)
    names = [n for n, m in unet.named_modules()
             if isinstance(m, torch.nn.Linear) and ".attentions." in n]  # fmt: skip
    layers = dict(unet.named_modules())
    factors = {(UNET, n): LoraFactors(torch.randn(rank, layers[n].in_features) * 0.01,
                                      torch.randn(layers[n].out_features, rank) * 0.01, rank)
               for n in names}  # fmt: skip
    x, t = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768)

    def best(f) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "lora.safetensors"
        save_lora(path, factors)
        out = {"layers": len(names), "rank": rank, "file_mb": path.stat().st_size / 2**20}
        step = lambda: unet(x, t, context=ctx)  # noqa: E731
        out["step_plain_s"] = best(step)

        def load(keep: bool) -> dict:
            return fuse(unet, lora_layers({UNET: unet}, [LoraSpec(path)])[UNET], keep)

        out["load_and_fuse_s"] = best(lambda: load(False))  # what generate and load() do
        start = time.perf_counter()
        saved = load(True)  # keeping the originals, for remove_loras
        out["load_fuse_keep_s"] = time.perf_counter() - start
        out["step_fused_s"] = best(step)
        out["restore_s"] = best(lambda: restore(unet, saved))
        lora = LoraNetwork(unet, names, rank, float(rank)).attach()
        out["step_hooks_s"] = best(step)
        lora.detach()
    return out


if __name__ == "__main__":  # python tests/test_lora_demo.py OUT [STEPS IMAGES RANK] [conv] | bench
    if sys.argv[1] == "bench":
        print(json.dumps(bench(), indent=2))
    else:
        args = sys.argv[2:]
        target = args.pop() if args and args[-1] in ("attn", "conv") else "attn"
        print(json.dumps(demo(Path(sys.argv[1]), *map(int, args), target=target), indent=2))
