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
from scipy import linalg


def pooled_pixels(images: torch.Tensor, size: int = 8) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, C * size * size) float64 features."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def fd(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    features: Callable[[torch.Tensor], np.ndarray] = pooled_pixels,
) -> float:
    return frechet_distance(features(images_a), features(images_b))
