"""Class accuracy of a class-conditional ``digits`` model, scored by a small classifier.

The classifier is an RBF support-vector machine (scikit-learn ``SVC``) on 8x8 images, trained
on the first 75% of a fixed stratified split of scikit-learn's bundled digits and tested on the
other 25%. Its training images are the originals plus their round trip through the default
training resolution (bilinear up to 16 px, area down to 8 px), the blur a generated image shows
once it is area-downsampled to 8x8. Training is deterministic, takes well under a second, and
happens once per process on first use; nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DIGITS_RESOLUTION
from ..errors import UserError
from ..io.model_folder import LoadedModel
from ..pipelines.settings import SampleSettings
from .batching import generate_batched

_SIDE = 8  # scikit-learn's digits are 8x8, values 0..16
_TEST_FRACTION = 0.25
_SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsClassifier:
    """A fitted classifier and its accuracy on the held-out split."""

    svc: Any
    heldout_accuracy: float
    n_train: int
    n_test: int

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) images in [-1, 1] (ink +1; RGB is averaged) -> (B,) digit labels."""
        return self.svc.predict(_features(images))


def _features(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, 64) on the dataset's 0..16 scale, area-downsampled."""
    if images.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(-1, 1).mean(1, keepdim=True)  # (B, 1, H, W)
    x = F.adaptive_avg_pool2d(x, _SIDE)  # (B, 1, 8, 8)
    return ((x + 1) * 8).flatten(1).double().numpy()  # (B, 64)


def _round_trip(images: np.ndarray, resolution: int) -> np.ndarray:
    """8x8 digits (0..16) -> bilinear up to ``resolution`` as DigitsDataset does -> (N, 64)."""
    x = torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return _features(x)


@lru_cache(maxsize=1)
def digits_classifier() -> DigitsClassifier:
    """The project's digits classifier, trained (deterministically) on first use."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    bunch = load_digits()
    images, labels = bunch.images, bunch.target  # (N, 8, 8) in 0..16, (N,)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=_TEST_FRACTION, stratify=labels, random_state=_SPLIT_SEED
    )
    features = np.concatenate(
        [x_train.reshape(len(x_train), -1), _round_trip(x_train, DIGITS_RESOLUTION)]
    )
    svc = SVC(C=10.0, gamma=0.001).fit(features, np.concatenate([y_train, y_train]))
    accuracy = float((svc.predict(x_test.reshape(len(x_test), -1)) == y_test).mean())
    return DigitsClassifier(svc, accuracy, len(x_train), len(x_test))


def _digit_of_class(model: LoadedModel) -> list[int]:
    """The digit each class index of ``model`` stands for; a clear error for other models."""
    names = model.class_names
    if not model.num_classes:
        raise UserError(
            f"{model.path}: eval digits needs a class-conditional digits model "
            "(train diffusion --data digits --cond class); this one has no classes"
        )
    if sorted(names) != [str(d) for d in range(10)] or model.num_classes != 10:
        raise UserError(
            f"{model.path}: eval digits needs classes 0-9; this model's are {names or '?'}"
        )
    return [int(n) for n in names]


def evaluate_digits(
    model: LoadedModel,
    *,
    per_class: int = 50,
    settings: SampleSettings | None = None,
    batch: int = 250,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Sample ``per_class`` images of every digit and classify them.

    Image k of class c uses seed ``seed + c * per_class + k``. Returns ``class_accuracy``
    (fraction classified as the digit asked for), ``per_class`` (digit -> accuracy),
    ``confusion`` (asked digit -> list of 10 counts of the predicted digits), ``images_per_s``
    (sampling only), ``n``, ``classifier_accuracy`` (the classifier's own held-out accuracy)
    and ``settings``. settings / keyword overrides: as for ``generate`` (steps: 50 unless
    given).
    """
    if per_class < 1:
        raise UserError(f"per_class must be >= 1, got {per_class}")
    digits = _digit_of_class(model)
    classifier = digits_classifier()
    labels = [c for c in range(len(digits)) for _ in range(per_class)]
    s = SampleSettings.build(settings or SampleSettings(steps=50), **overrides)
    s = s.replace(num=len(labels)).resolve(model)
    images, seconds = generate_batched(
        model, s, labels=labels, batch=batch, progress=progress, desc="eval digits"
    )
    asked = np.array([digits[c] for c in labels])
    predicted = classifier.predict(images)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (asked, predicted), 1)
    n = len(labels)
    return {
        "class_accuracy": float((asked == predicted).mean()),
        "per_class": {str(d): float(confusion[d, d] / confusion[d].sum()) for d in range(10)},
        "confusion": {str(d): confusion[d].tolist() for d in range(10)},
        "images_per_s": n / max(seconds, 1e-9),
        "n": n,
        "classifier_accuracy": classifier.heldout_accuracy,
        "settings": dict(
            per_class=per_class,
            seed=s.seed,
            sampler=s.sampler,
            steps=s.steps,
            guidance=s.guidance,
        ),
    }
