"""`latentforge eval fid`: distribution metrics between a reference set and a generated (or
given) set, over a feature network.

Sets are data specs (`shapes:64`, `digits`, `folder:PATH`; a bare folder path means
`folder:PATH`) or a model plus sampling settings, generated on the fly in seeded batches. A
model is conditioned on the reference items: text models get their captions, class models
their labels, one generated image per reference image, so the comparison is between matched
conditional distributions. With a model and no reference, the reference is the model's own
data spec on a held-out stream (`data_seed` 1; models train on stream 0).

Reference features are cached on disk (`cache_dir`/features), keyed by the set (spec, stream,
count, size; a folder's file names, sizes and times) and the feature network, so repeated
evaluations against one reference compute it once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_dataset, parse_spec
from ..errors import UserError
from ..io.model_folder import LoadedModel
from ..pipelines.settings import SampleSettings
from ..prompt_syntax import escape
from .batching import generate_batched
from .distribution import distribution_metrics
from .fd import pooled_pixels

Features = Callable[[torch.Tensor], np.ndarray]

# name -> a factory of feature networks: (B, C, H, W) images in [-1, 1] -> (B, d) features.
# "pixels": 8x8 average-pooled RGB, a learned-nothing baseline. A dataset's wing registers its
# own (`register_features`), built on first use.
FEATURES: dict[str, Callable[[], Features]] = {"pixels": lambda: pooled_pixels}


def register_features(name: str, factory: Callable[[], Features]) -> None:
    """Make `--features NAME` build its network with `factory()` (once, when first used)."""
    FEATURES[name] = functools.cache(factory)


def feature_network(name: str, resize: str = "clean") -> Features:
    """A registered network by name, or `inception:FILE`: FID's Inception-v3 from a local
    weights file, images resized to 299 by `resize` (`metrics.inception.RESIZES`)."""
    if name.startswith("inception:"):
        return _cached_inception(name.split(":", 1)[1], resize)
    if name not in FEATURES:
        raise UserError(f"unknown feature network {name!r}; choose one of {sorted(FEATURES)} "
                        "or inception:FILE")  # fmt: skip
    return FEATURES[name]()


@functools.lru_cache(maxsize=2)
def _cached_inception(path: str, resize: str) -> Features:
    from .inception import InceptionFeatures

    return InceptionFeatures(path, resize)


def feature_key(name: str, resize: str) -> str:
    """What identifies a feature network in the cache: its name, and for a weights file its
    resize rule, size and modification time."""
    if not name.startswith("inception:"):
        return name
    path = Path(name.split(":", 1)[1])
    stat = path.stat() if path.is_file() else None
    return f"{name}|{resize}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"


def as_spec(source: str) -> str:
    """A data spec; an existing folder path means `folder:PATH`."""
    return f"folder:{source}" if Path(source).is_dir() else source


def reference_spec(ref: str | None, model: LoadedModel | None) -> str:
    """The reference set's data spec: `ref` (a spec or a folder), else `model`'s training data."""
    if ref is None:
        if model is None:
            raise UserError("--gen needs a reference set (--ref)")
        ref = model.meta.data.spec
        if not ref:
            raise UserError(f"{model.path} records no training data; give --ref")
    return as_spec(ref)


def reference_items(spec: str, n: int, data_seed: int) -> tuple[torch.Tensor, list, list]:
    """The first n items of stream `data_seed` of `spec`: images, captions, labels."""
    ds = load_dataset(spec, seed=data_seed)
    if len(ds) < n:
        raise UserError(f"{spec!r} has {len(ds)} images; asked for {n}")
    items = [ds[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    return images, [it.get("caption", "") for it in items], [it.get("label", -1) for it in items]


def _set_key(spec: str, n: int, data_seed: int, size: tuple[int, int], features: str) -> str:
    record: dict[str, Any] = {"spec": spec, "n": n, "data_seed": data_seed, "size": size,
                              "features": features}  # fmt: skip
    if spec.startswith("folder:"):
        root = Path(spec.split(":", 1)[1].rsplit(":", 1)[0])
        if root.is_dir():
            record["files"] = sorted(
                (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*")
                if p.is_file()
            )
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(-1, 1)


def features_of(images: torch.Tensor, fn: Features, batch: int) -> np.ndarray:
    """Features of (n, C, H, W) images, grey ones as RGB (as FID's networks take them)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return np.concatenate([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


def reference_features(
    spec: str,
    n: int,
    data_seed: int,
    size: tuple[int, int] | None,
    features: str,
    *,
    resize: str = "clean",
    batch: int = 64,
    cache_dir: Path | None = None,
) -> tuple[np.ndarray, list, list, bool]:
    """(features, captions, labels, from_cache) of the reference set, resized to `size`."""
    images, captions, labels = reference_items(spec, n, data_seed)
    size = size or tuple(images.shape[-2:])
    path = None
    if cache_dir is not None:
        path = (
            cache_dir
            / "features"
            / f"{_set_key(spec, n, data_seed, size, feature_key(features, resize))}.npy"
        )
        if path.is_file():
            try:
                feats = np.load(path, allow_pickle=False)
                if feats.shape[0] == n:
                    return feats, captions, labels, True
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed and replaced
    feats = features_of(_resize(images, size), feature_network(features, resize), batch)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, feats, allow_pickle=False)
        os.replace(tmp, path)
    return feats, captions, labels, False


# Prompt scorers: a dataset wing's reader of its own images, registered under its data kind
# (`shapes`): for images generated from that kind's captions, whether each shows what its
# caption states (None where a caption states nothing the reader checks).
PromptScorer = Callable[[torch.Tensor, Sequence[str]], list]
_PROMPT_SCORERS: dict[str, PromptScorer] = {}


def register_prompt_scorer(kind: str, scorer: PromptScorer) -> None:
    """Register the prompt scorer for reference sets of data kind `kind` (`report trilemma`'s
    prompt_accuracy column)."""
    _PROMPT_SCORERS[kind] = scorer


def prompt_accuracy(
    spec: str, images: torch.Tensor, captions: Sequence[str | None]
) -> float | None:
    """The fraction of images that show what their caption states, by the scorer registered for
    the reference set's data kind; None without a scorer or without checkable captions."""
    scorer = _PROMPT_SCORERS.get(parse_spec(spec)[0])
    if scorer is None or not any(captions):
        return None
    hits = [h for h in scorer(images, [c or "" for c in captions]) if h is not None]
    return float(np.mean(hits)) if hits else None


def reference_conditioning(model: LoadedModel, captions: list, labels: list) -> dict[str, list]:
    if model.conditioning == "text":  # captions are plain text, not prompt syntax
        return {"prompts": [escape(c or "") for c in captions]}
    if model.conditioning == "class":
        if any(label is None or label < 0 for label in labels):
            raise UserError("a class model needs a labelled reference set (digits, shapes)")
        return {"labels": [int(label) for label in labels]}
    return {}


def evaluate_fid(
    *,
    ref: str | None = None,
    gen: str | None = None,
    model: LoadedModel | None = None,
    settings: SampleSettings | None = None,
    features: str = "pixels",
    resize: str = "clean",
    n: int = 1000,
    data_seed: int = 1,
    batch: int = 64,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """FID, KID +- std, precision, recall, density and coverage of `gen` (a data spec or
    folder) or of `model`'s samples under `settings`, against `ref`."""
    if (gen is None) == (model is None):
        raise UserError("give a generated set (--gen) or a model (--model), not both")
    ref = reference_spec(ref, model)
    network = feature_network(features, resize)  # an unknown name fails before any work
    size = None if model is None else tuple(model.output_shape[-2:])
    t0 = time.perf_counter()
    real, captions, labels, cached = reference_features(
        ref, n, data_seed, size, features, resize=resize, batch=batch, cache_dir=cache_dir
    )
    out: dict[str, Any] = {}
    if model is not None:
        s = (settings or SampleSettings()).replace(num=n).resolve(model)
        images, seconds = generate_batched(
            model, s, batch=batch, progress=progress, desc="sampling",
            **reference_conditioning(model, captions, labels),
        )  # fmt: skip
        out["gen"] = str(model.path)
        out["settings"] = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                           "seed": s.seed, "precision": s.precision}  # fmt: skip
        out["seconds_per_image"] = round(seconds / n, 5)
        out["images_per_s"] = round(n / seconds, 3)
    else:
        gen = as_spec(gen)
        images = reference_items(gen, n, 0)[0]
        out["gen"] = gen
    fake = features_of(images, network, batch)
    if fake.shape[1] != real.shape[1]:
        raise UserError(f"the two sets' features differ in size ({real.shape[1]} and "
                        f"{fake.shape[1]}): give images of one size")  # fmt: skip
    metrics = distribution_metrics(real, fake)
    return {
        **{k: round(float(metrics[k]), 6) for k in
           ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage")},
        "n": n, "features": features, "resize": resize if features != "pixels" else None,
        "ref": ref, "data_seed": data_seed,
        "ref_cached": cached, **out,
        "seconds": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
