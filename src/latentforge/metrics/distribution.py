"""Distribution metrics over feature sets: FID, KID, improved precision / recall, density /
coverage. Every function takes two (n, d) feature arrays, `real` then `fake`, from any feature
network (`metrics.features`), and is written from the papers' definitions:

- FID (Heusel et al. 2017): the Fréchet distance of Gaussians fitted to the two sets
  (`fd.frechet_distance`).
- KID (Bińkowski et al. 2018): the unbiased MMD^2 estimate under the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets, with its standard deviation over
  them (the form clean-fid and torch-fidelity report; 100 subsets of 1,000 by default).
- Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of
  balls around its points reaching their k-th nearest neighbour (k = 3); precision is the share
  of fake points inside the real manifold, recall the share of real points inside the fake one.
- Density and coverage (Naeem et al. 2020, k = 5): density counts how many real balls hold
  each fake point (divided by k: about 1 when the sets match, above 1 when fakes crowd real
  modes); coverage is the share of real points whose own ball holds a fake point.

Distances are computed in float64 in row chunks, so 10,000 x 10,000 sets need no 800 MB matrix.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError
from .fd import frechet_distance

CHUNK = 2048  # rows of a distance block


def _check(real: np.ndarray, fake: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = np.asarray(real), np.asarray(fake)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise UserError(f"feature sets must be (n, d) of one d, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise UserError("feature sets hold NaN or Inf")
    return torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64))


def _min_over_chunks(a: torch.Tensor, b: torch.Tensor, reduce) -> torch.Tensor:
    """reduce(distances of a chunk of a's rows to all of b) for every chunk, concatenated."""
    return torch.cat([reduce(torch.cdist(a[i : i + CHUNK], b)) for i in range(0, len(a), CHUNK)])


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) distance from each point to its k-th nearest other point of the same set."""
    if not 1 <= k < len(x):
        raise UserError(f"k = {k} needs more than {k} points per set, got {len(x)}")
    # the point itself is its own nearest neighbour (distance 0): take the (k + 1)-th smallest
    return _min_over_chunks(x, x, lambda d: d.kthvalue(k + 1, dim=1).values)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(len(points),) how many of the balls (centres, radii) hold each point."""
    return _min_over_chunks(points, centres, lambda d: (d <= radii[None]).sum(1))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls."""
    a, b = _check(real, fake)
    precision = (_inside(b, a, knn_radii(a, k)) > 0).double().mean().item()
    recall = (_inside(a, b, knn_radii(b, k)) > 0).double().mean().item()
    return precision, recall


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020): balls around the real points only."""
    a, b = _check(real, fake)
    radii = knn_radii(a, k)
    density = _inside(b, a, radii).double().sum().item() / (k * len(b))
    nearest_fake = _min_over_chunks(a, b, lambda d: d.min(1).values)
    coverage = (nearest_fake <= radii).double().mean().item()
    return density, coverage


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 under the cubic polynomial kernel (x.y / d + 1)^3."""
    d = x.shape[1]
    kxx, kyy, kxy = ((u @ v.T / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    off_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    off_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return (off_x + off_y - 2 * kxy.mean()).item()


def kid(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased KID over `subsets` random subsets of `subset_size` points of
    each set (drawn without replacement within a subset, seeded). Sets of fewer than twice
    that use subsets of half their size, so the std still measures something (subsets of the
    whole set are all alike); the mean is unbiased at any subset size."""
    a, b = _check(real, fake)
    n = min(len(a), len(b))
    size = subset_size if n >= 2 * subset_size else n // 2
    if size < 2:
        raise UserError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    values = [
        _mmd2_unbiased(a[torch.randperm(len(a), generator=g)[:size]],
                       b[torch.randperm(len(b), generator=g)[:size]])
        for _ in range(subsets)
    ]  # fmt: skip
    std = float(np.std(values)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std


def distribution_metrics(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    k_pr: int = 3,
    k_dc: int = 5,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, float | int]:
    """Every metric above: the keys `eval fid --json` prints."""
    a, b = _check(real, fake)
    if min(len(a), len(b)) < 2:
        raise UserError(f"need at least 2 images per set, got {len(a)} and {len(b)}")
    k_pr, k_dc = min(k_pr, len(a) - 1, len(b) - 1), min(k_dc, len(a) - 1)
    kid_mean, kid_std = kid(real, fake, kid_subsets, kid_subset_size)
    precision, recall = precision_recall(real, fake, k_pr)
    density, coverage = density_coverage(real, fake, k_dc)
    return {
        "fid": frechet_distance(a.numpy(), b.numpy()),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        "n_real": len(a),
        "n_fake": len(b),
    }
