"""Fréchet distance (Heusel et al. 2017) between two feature sets, over an injected extractor.

The default extractor is deliberately simple and learned-nothing: images average-pooled to 8x8
RGB (192 features). It ranks samples of the small procedural datasets sensibly and costs
nothing; pass an Inception-like network's features for the usual FID.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def pooled_pixels(images: torch.Tensor, size: int = 8) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, C * size * size) float64 features."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    S_a S_b is similar to the PSD matrix S_a^(1/2) S_b S_a^(1/2), so the trace of its square
    root is the sum of the square roots of its (real, non-negative) eigenvalues; no matrix
    square root is formed, and rank-deficient covariances (fewer samples than features) are fine.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s_a @ s_b).real.clip(min=0)
    return float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(eig).sum()
    )


def fd(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    features: Callable[[torch.Tensor], np.ndarray] = pooled_pixels,
) -> float:
    return frechet_distance(features(images_a), features(images_b))
