"""FID, KID, precision / recall and density / coverage against their definitions, on Gaussian
features with known answers."""

import itertools

import numpy as np
import pytest

from latentforge.errors import UserError
from latentforge.metrics import distribution as dm
from latentforge.metrics.fd import frechet_distance

D = 8


def _gauss(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)) + shift


def _two_modes(n: int, seed: int, modes=(0, 1)) -> np.ndarray:
    """Unit Gaussians at 0 and at 20 along the first axis (far apart), equally often."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, D))
    centres[1, 0] = 20
    return rng.standard_normal((n, D)) + centres[rng.choice(modes, n)]


def test_same_distribution_scores_as_equal():
    m = dm.distribution_metrics(_gauss(600, 0), _gauss(600, 1))
    assert m["fid"] < 0.15
    assert abs(m["kid"]) < 3 * m["kid_std"]
    assert m["precision"] > 0.85 and m["recall"] > 0.85
    assert 0.85 < m["density"] < 1.15 and m["coverage"] > 0.9


def test_a_shift_costs_its_squared_length_in_fid():
    """Equal covariances: FID = |mu_a - mu_b|^2 (= D for a unit shift on every axis)."""
    fid = frechet_distance(_gauss(4000, 0), _gauss(4000, 1, shift=1.0))
    assert fid == pytest.approx(D, rel=0.05)
    m = dm.distribution_metrics(_gauss(600, 0), _gauss(600, 1, shift=1.0))
    assert m["precision"] < 0.7 and m["recall"] < 0.7 and m["kid"] > 10 * m["kid_std"]


def test_dropping_a_mode_halves_recall_and_coverage_not_precision():
    real, fake = _two_modes(800, 0), _two_modes(800, 1, modes=(0,))
    p, r = dm.precision_recall(real, fake)
    d, c = dm.density_coverage(real, fake)
    assert p > 0.85 and 0.4 < r < 0.6
    assert 0.4 < c < 0.6 and d > 0.85
    both = dm.precision_recall(real, _two_modes(800, 2))
    assert min(both) > 0.85


def test_fid_equals_the_scipy_sqrtm_form():
    linalg = pytest.importorskip("scipy.linalg")
    a = _gauss(300, 0) @ np.random.default_rng(5).standard_normal((D, D))
    b = _gauss(300, 1, shift=0.3)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_kid_is_the_unbiased_mmd_and_averages_to_zero():
    """Against the double sum of the definition on a tiny set, and unbiased: over many draws
    from one distribution its mean is within a few standard errors of 0 (the biased V-statistic
    would sit clearly above it)."""
    x, y = _gauss(6, 0), _gauss(5, 1, shift=0.5)

    def k(u, v):
        return (u @ v / D + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(u, v) for u in x for v in y) / (m * n)
    import torch

    exact = dm._mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert exact == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    values = [dm.kid(_gauss(40, 2 * s), _gauss(40, 2 * s + 1), subsets=1, subset_size=20)[0]
              for s in range(200)]  # fmt: skip
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))


def test_bad_feature_sets_are_user_errors():
    with pytest.raises(UserError, match="one d"):
        dm.distribution_metrics(_gauss(10, 0), np.zeros((10, 3)))
    with pytest.raises(UserError, match="NaN"):
        dm.distribution_metrics(_gauss(10, 0), np.full((10, D), np.nan))
    with pytest.raises(UserError, match="at least 2"):
        dm.distribution_metrics(_gauss(10, 0), _gauss(1, 1))


def test_eval_fid_on_a_model_caches_the_reference(tiny_digits_model, tmp_path, capsys):
    """A class model generates one image per labelled reference image; --json has the
    documented keys; the second run reads the reference features from the cache."""
    import json

    from latentforge.cli import main

    argv = ["eval", "fid", "--model", str(tiny_digits_model), "--ref", "digits", "--n", "12",
            "--steps", "2", "--cache-dir", str(tmp_path), "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    keys = {"fid", "kid", "kid_std", "precision", "recall", "density", "coverage", "n",
            "features", "seconds_per_image"}  # fmt: skip
    assert keys <= set(first) and first["n"] == 12 and not first["ref_cached"]
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["ref_cached"] and second["fid"] == first["fid"]
    assert len(list((tmp_path / "features").glob("*.npy"))) == 1


def test_eval_fid_between_data_sets(tmp_path, capsys):
    """digits against itself is 0 / 1 everywhere; shapes against digits is far and disjoint."""
    from latentforge.metrics.fid_eval import evaluate_fid

    same = evaluate_fid(ref="digits", gen="digits", n=40)
    assert abs(same["fid"]) < 1e-4 and same["precision"] == same["recall"] == 1.0
    assert same["coverage"] == 1.0
    far = evaluate_fid(ref="digits:16", gen="shapes:16", n=40)
    assert far["fid"] > 1 and far["precision"] < 0.2 and far["recall"] < 0.2
    with pytest.raises(UserError, match="unknown feature network"):
        evaluate_fid(ref="digits", gen="digits", n=4, features="inception")
    with pytest.raises(UserError, match="not both"):
        evaluate_fid(ref="digits", gen="digits", model=object(), n=4)
