"""PSNR and SSIM against closed forms."""

import math

import numpy as np
import pytest
import torch

from latentforge.metrics.quality import psnr_db, psnr_per_image, ssim


def _images(seed: int, shape=(3, 3, 24, 24)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_of_a_known_error():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, 20 dB
    assert psnr_db(x, y) == pytest.approx(20.0, abs=1e-5)
    assert torch.allclose(psnr_per_image(x, y), torch.full((2,), 20.0))


def test_ssim_of_identical_images_is_one_and_symmetric():
    x, y = _images(0), _images(1)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-7)
    assert (ssim(x, y).abs() < 0.2).all()  # independent noise images hardly correlate


@pytest.mark.parametrize("a, b", [(0.2, 0.7), (0.5, 0.5), (0.0, 1.0)])
def test_ssim_of_constant_images_has_its_closed_form(a, b):
    # no variance, no covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    x = torch.full((1, 3, 16, 16), 2 * a - 1)
    y = torch.full((1, 3, 16, 16), 2 * b - 1)
    c1 = 0.01**2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)


def test_ssim_falls_as_noise_grows():
    x = torch.nn.functional.avg_pool2d(_images(2, (1, 3, 48, 48)), 2)  # some structure
    noise = _images(3, x.shape)
    scores = [ssim(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.5)]
    assert scores[0] > scores[1] > scores[2]
    assert not math.isnan(scores[2])


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_frechet_distance_against_the_matrix_square_root():
    """The eigenvalue form equals the textbook sqrtm form; a shift adds exactly |c|^2; identical
    sets score 0; fewer samples than features (singular covariances) stay finite."""
    from scipy import linalg

    from latentforge.metrics.fd import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(200, 6)) * [1, 2, 3, 0.5, 1, 1] + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    c = np.array([1.0, -2.0, 0.5, 0, 0, 3])
    assert frechet_distance(a, a + c) == pytest.approx((c**2).sum(), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-8
    small = frechet_distance(rng.normal(size=(4, 12)), rng.normal(size=(5, 12)))
    assert np.isfinite(small) and small > 0
