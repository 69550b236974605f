"""`latentforge report trilemma`: quality, diversity and speed of a model's samplers in one
table, the generative learning trilemma measured (Xiao et al. 2022 put DDPM, DDIM, their
DDGAN and StyleGAN in one table of FID, recall, NFE and seconds).

For each model, sampler and budget of network evaluations (NFE) the report generates n images
conditioned on n reference items (captions or labels, as `eval fid`), and measures:

- quality: FID (and KID) against the reference set, precision; for a reference set whose
  dataset wing registered a prompt scorer (`fid_eval.register_prompt_scorer`: shapes), the
  prompt accuracy, the fraction of images showing what their caption states;
- diversity: recall and coverage against the reference set, and for conditional models the
  per-prompt diversity, the mean pairwise feature distance among images of one prompt
  (`per_prompt` images for each of the first `prompts` reference prompts);
- speed: the NFE actually spent (denoiser calls per image, counted), seconds per image and
  images per second of sampling and decoding on this machine, in the same run.

Steps per budget: one-call samplers take nfe steps; two-call samplers (heun, dpm2,
dpmpp_2s_ancestral) take (nfe + 1) // 2 steps, as their last step to sigma = 0 costs one call.
The counted NFE is what the row reports. Classifier-free guidance evaluates the conditional
and unconditional halves in one batched call, counted once (as the field counts NFE); the
seconds include its cost.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import sampling
from ..errors import UserError
from ..io.model_folder import LoadedModel
from ..pipelines.settings import SampleSettings
from .batching import generate_batched
from .distribution import distribution_metrics
from .fid_eval import (
    feature_network,
    features_of,
    prompt_accuracy,
    reference_conditioning,
    reference_features,
    reference_spec,
)

DEFAULT_SAMPLERS = ("ddim", "euler_ancestral", "heun", "dpmpp_2m", "unipc")
DEFAULT_NFE = (1, 2, 4, 8, 16, 32)
ROW_KEYS = ("model", "sampler", "nfe", "steps", "fid", "kid", "kid_std", "precision", "recall",
            "density", "coverage", "diversity", "prompt_accuracy", "seconds_per_image",
            "images_per_s")  # fmt: skip


class _CallCounter:
    """Counts forward calls of a module (a forward hook) while in use."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, 0

    def __enter__(self) -> _CallCounter:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, *_) -> None:
        self.calls += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _diversity(
    model: LoadedModel, settings: SampleSettings, prompts: dict, network, per_prompt: int,
    batch: int,
) -> float | None:  # fmt: skip
    """Mean pairwise feature distance among `per_prompt` images of each prompt (labels), over
    the given prompts; None for an unconditional model."""
    key = next(iter(prompts), None)
    if key is None or per_prompt < 2:
        return None
    groups = prompts[key]
    repeated = {key: [c for c in groups for _ in range(per_prompt)]}
    s = settings.replace(num=len(groups) * per_prompt, seed=settings.seed + 10_000_000)
    images, _ = generate_batched(model, s, batch=batch, **repeated)
    feats = torch.from_numpy(features_of(images, network, batch))
    dists = [
        torch.pdist(feats[i * per_prompt : (i + 1) * per_prompt]).mean().item()
        for i in range(len(groups))
    ]
    return float(np.mean(dists))


def trilemma(
    models: Sequence[LoadedModel],
    *,
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    nfes: Sequence[int] = DEFAULT_NFE,
    n: int = 1000,
    ref: str | None = None,
    data_seed: int = 1,
    features: str = "pixels",
    resize: str = "clean",
    guidance: float | None = None,
    seed: int = 0,
    prompts: int = 8,
    per_prompt: int = 4,
    batch: int = 64,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per (model, sampler, NFE budget): the keys of ROW_KEYS."""
    if not models or not samplers or not nfes:
        raise UserError("the report needs at least one model, sampler and NFE budget")
    if any(k < 1 for k in nfes):
        raise UserError(f"NFE budgets must be >= 1, got {list(nfes)}")
    network = feature_network(features, resize)
    rows = []
    cells = [(m, s, k) for m in models for s in samplers for k in sorted(set(nfes))]
    from tqdm.auto import tqdm

    for model in models:  # one-time costs (lazy text encoder, kernel selection) stay untimed
        generate_batched(model, SampleSettings(steps=1, num=2).resolve(model), batch=2,
                         **reference_conditioning(model, ["a"] * 2, [0] * 2))  # fmt: skip
    references: dict[tuple, tuple] = {}
    for model, sampler, nfe in tqdm(cells, desc="trilemma", unit="cell", disable=not progress):
        spec = reference_spec(ref, model)
        size = tuple(model.output_shape[-2:])
        if (spec, size) not in references:
            references[(spec, size)] = reference_features(
                spec, n, data_seed, size, features, resize=resize, batch=batch,
                cache_dir=cache_dir,
            )  # fmt: skip
        real, captions, labels, _ = references[(spec, size)]
        steps = sampling.steps_for_nfe(nfe, sampling.calls_per_step(sampler))
        settings = SampleSettings.build(sampler=sampler, steps=steps, guidance=guidance,
                                        seed=seed, num=n).resolve(model)  # fmt: skip
        cond = reference_conditioning(model, captions, labels)
        with _CallCounter(model.denoiser) as counter:
            images, seconds = generate_batched(model, settings, batch=batch, **cond)
        batches = -(-n // batch)
        fake = features_of(images, network, batch)
        m = distribution_metrics(real, fake, kid_subsets=20)
        first = {k: v[:prompts] for k, v in cond.items()}
        rows.append({
            "model": model.path.name, "sampler": sampler, "nfe": counter.calls / batches,
            "nfe_budget": nfe, "steps": steps, "guidance": settings.guidance,
            **{k: round(float(m[k]), 6) for k in
               ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage")},
            "diversity": _diversity(model, settings, first, network, per_prompt, batch),
            "prompt_accuracy": (prompt_accuracy(spec, images, captions)
                                if model.conditioning == "text" else None),
            "seconds_per_image": round(seconds / n, 5), "images_per_s": round(n / seconds, 3),
            "n": n, "features": features,
        })  # fmt: skip
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """DDGAN's layout: one line per configuration, quality, diversity and speed side by side."""
    lines = [
        "| model | sampler | NFE | FID ↓ | precision ↑ | recall ↑ | coverage ↑ | diversity "
        "| prompt acc. ↑ | s / image ↓ | images / s ↑ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def opt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['nfe']:g} | {r['fid']:.3f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['coverage']:.3f} | "
            f"{opt(r['diversity'])} | {opt(r.get('prompt_accuracy'))} | "
            f"{r['seconds_per_image']:.4f} | {r['images_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _corner_scores(rows: Sequence[dict]) -> np.ndarray:
    """(quality, diversity, speed) of each row in [0, 1] across the report: quality from FID
    (best 1, worst 0, on a log scale), diversity is recall, speed from images/s (log scale)."""

    def unit(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
        v = np.log(np.maximum(values, 1e-9))
        span = v.max() - v.min()
        u = (v - v.min()) / span if span > 0 else np.ones_like(v)
        return u if higher_is_better else 1 - u

    fid = np.array([r["fid"] for r in rows])
    quality = unit(fid - min(fid.min(), 0) + 1e-3, higher_is_better=False)
    diversity = np.clip([r["recall"] for r in rows], 0, 1)
    speed = unit(np.array([r["images_per_s"] for r in rows]), higher_is_better=True)
    return np.stack([quality, diversity, speed], 1)


def plot(rows: Sequence[dict], out: Path) -> list[Path]:
    """FID vs NFE per sampler, recall vs FID, and the triangle; the PNG paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the report's figures need matplotlib: pip install matplotlib") from None
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    key = lambda r: (r["model"], r["sampler"])  # noqa: E731
    groups = [(k, list(g)) for k, g in itertools.groupby(sorted(rows, key=key), key=key)]
    multi = len({r["model"] for r in rows}) > 1

    def label(k):
        return f"{k[0]} {k[1]}" if multi else k[1]

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, g in groups:
        g = sorted(g, key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in g], [r["fid"] for r in g], marker="o", label=label(k))
    ax.set(xscale="log", yscale="log", xlabel="NFE (denoiser calls per image)",
           ylabel="FID", title="Quality against network evaluations")  # fmt: skip
    ax.legend(fontsize=8)
    paths.append(out / "fid_vs_nfe.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, g in groups:
        ax.scatter([r["fid"] for r in g], [r["recall"] for r in g], label=label(k))
        for r in g:
            ax.annotate(f"{r['nfe']:g}", (r["fid"], r["recall"]), fontsize=7)
    ax.set(xscale="log", xlabel="FID (lower is better)", ylabel="recall (higher is better)",
           title="Diversity against quality (labels: NFE)")  # fmt: skip
    ax.legend(fontsize=8)
    paths.append(out / "recall_vs_fid.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)

    scores = _corner_scores(rows)
    corners = np.array([[0.5, np.sqrt(3) / 2], [0.0, 0.0], [1.0, 0.0]])  # quality, div., speed
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.6")
    for name, (x, y), dy in zip(("quality", "diversity", "speed"), corners, (0.04, -0.06, -0.06),
                                strict=True):  # fmt: skip
        ax.text(x, y + dy, name, ha="center", fontsize=11)
    index = {id(r): i for i, r in enumerate(rows)}
    for k, g in groups:
        w = scores[[index[id(r)] for r in g]] + 1e-9
        xy = (w / w.sum(1, keepdims=True)) @ corners
        ax.scatter(xy[:, 0], xy[:, 1], s=20 + 60 * w.sum(1), label=label(k), alpha=0.8)
        for (x, y), r in zip(xy, g, strict=True):
            ax.annotate(f"{r['nfe']:g}", (x, y), fontsize=7)
    title = "Each configuration's pull towards the three corners\n(size: their sum)"
    ax.set(xlim=(-0.1, 1.1), ylim=(-0.12, 0.98), aspect="equal", title=title)
    ax.axis("off")
    ax.legend(fontsize=8, loc="upper right")
    paths.append(out / "triangle.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)
    return paths


def write_report(rows: Sequence[dict], out: Path, meta: dict) -> dict[str, Path]:
    """trilemma.json (rows + how they were made), trilemma.md and the figures under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "trilemma.json", "markdown": out / "trilemma.md"}
    files["json"].write_text(json.dumps({**meta, "rows": list(rows)}, indent=2) + "\n")
    files["markdown"].write_text(markdown_table(rows))
    for p in plot(rows, out):
        files[p.stem] = p
    return files
