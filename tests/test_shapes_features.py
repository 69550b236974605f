"""`--features shapes` (shapes/features.py): the shipped encoder's heads on fresh data, and that
FID / precision / recall over its features rank what they should: two real sets as equal,
blur, noise and hue shifts worse the stronger they are, a set without stars as missing modes."""

import json

import numpy as np
import pytest
import torch

from latentforge.cli import main
from latentforge.data import load_dataset
from latentforge.errors import UserError
from latentforge.metrics.distribution import distribution_metrics, precision_recall
from latentforge.metrics.fd import frechet_distance
from latentforge.metrics.fid_eval import evaluate_fid, feature_network
from latentforge.shapes import features as sf

N = 300


@pytest.fixture(scope="module")
def net() -> sf.ShapesFeatures:
    return feature_network("shapes")


@pytest.fixture(scope="module")
def real(net) -> np.ndarray:
    return net(sf.shapes_images(N, 1))


@pytest.fixture(scope="module")
def other() -> torch.Tensor:
    return sf.shapes_images(N, 2)


def _fid(real: np.ndarray, net, images: torch.Tensor) -> float:
    return frechet_distance(real, net(images))


def test_the_shipped_heads_read_fresh_scenes_and_held_out_digits():
    """A stream no training or validation run has seen (seed 7); the digits kept out."""
    acc = sf.head_accuracy(sf.load_encoder(), n=250, seed=7)
    # a multi-label head counts as right only when every one of its outputs is
    assert acc["background"] > 0.99 and acc["count"] > 0.97
    assert acc["position"] > 0.9 and acc["size"] > 0.9 and acc["presence"] > 0.8
    assert acc["digits"] > 0.95


def test_the_shipped_config_records_its_command_and_accuracy():
    info = json.loads(sf.WEIGHTS.with_suffix(".json").read_text())
    assert "train-shapes" in info["command"] and set(info["held_out_accuracy"]) == set(sf.HEADS)
    assert 100_000 <= info["parameters"] <= 500_000
    assert sf.WEIGHTS.stat().st_size < 2 * 2**20


def test_two_real_sets_score_near_zero_and_far_below_a_degraded_one(net, real, other):
    fid_real = _fid(real, net, other)
    fid_noised = _fid(real, net, sf.add_noise(other, 0.2))
    assert fid_real < 0.02 * fid_noised
    m = distribution_metrics(real, net(other))
    assert m["precision"] > 0.8 and m["recall"] > 0.8


@pytest.mark.parametrize(
    "degrade, levels",
    [(sf.gaussian_blur, (0.5, 1.0, 2.0)), (sf.add_noise, (0.05, 0.1, 0.2)),
     (sf.rotate_hue, (15, 45, 90))],
    ids=["blur", "noise", "hue"],
)  # fmt: skip
def test_stronger_degradations_score_worse(net, real, other, degrade, levels):
    """Blur 0.5 px is within the sampling noise of a clean set at this n; the steps between
    levels are not."""
    fids = [_fid(real, net, degrade(other, level)) for level in levels]
    assert fids[0] < fids[1] < fids[2], fids
    assert fids[2] > 1.5 * _fid(real, net, other)


def test_dropping_stars_lowers_recall_not_precision(net, real, other):
    p_full, r_full = precision_recall(real, net(other))
    p_drop, r_drop = precision_recall(real, net(sf.shapes_images(N, 2, exclude_shape="star")))
    assert r_drop < r_full - 0.15
    assert p_drop > 0.8 and p_drop > p_full - 0.05


def test_digits_halves_agree_and_blur_and_noise_are_seen(net):
    digits = torch.stack([it["image"] for it in load_dataset("digits:16")])  # (1797, 1, 16, 16)
    a, b = net(digits[:898]), digits[898:1796]
    fid_real = _fid(a, net, b)
    assert fid_real < 0.2 * _fid(a, net, sf.gaussian_blur(b, 1.0))
    assert fid_real < 0.2 * _fid(a, net, sf.add_noise(b, 0.1))


def test_features_are_deterministic_and_batch_independent(net, other):
    whole = net(other[:32])
    assert whole.dtype == np.float64 and whole.shape == (32, sf.EncoderConfig().embed)
    np.testing.assert_array_equal(whole, net(other[:32]))
    pieces = np.concatenate([net(other[i : min(i + 5, 32)]) for i in range(0, 32, 5)])
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)


def test_any_size_and_grey_images_are_resized_to_the_network(net, other):
    small = torch.nn.functional.interpolate(other[:4], size=(32, 32), mode="area")
    assert net(small).shape == (4, sf.EncoderConfig().embed)
    grey = other[:4].mean(1, keepdim=True)
    np.testing.assert_allclose(net(grey), net(grey.expand(-1, 3, -1, -1)), rtol=1e-6)


def test_eval_fid_uses_the_registered_network(net):
    """`eval fid --features shapes`: the reference is stream 1, a --gen spec stream 0."""
    result = evaluate_fid(ref="shapes:64", gen="shapes:64", features="shapes", n=40)
    expected = frechet_distance(net(sf.shapes_images(40, 1)), net(sf.shapes_images(40, 0)))
    assert result["features"] == "shapes" and result["fid"] == pytest.approx(expected, abs=1e-5)


def test_a_bad_weights_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="config"):
        sf.load_encoder(tmp_path / "missing.safetensors")
    net = sf.ShapesEncoder(sf.EncoderConfig(widths=(8, 16)))
    sf.save_encoder(net, tmp_path / "small.safetensors", {})
    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps({"config": {"widths": [8, 32]}}))
    with pytest.raises(UserError, match="do not match"):
        sf.load_encoder(tmp_path / "small.safetensors")


def test_the_training_command_runs_and_writes_what_loads(tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    assert main(["features", "train-shapes", "--out", str(out), "--steps", "20",
                 "--batch", "8"]) == 0  # fmt: skip
    info = json.loads(capsys.readouterr().out)
    assert info["data"]["shapes_train_images"] == 160
    assert sf.load_encoder(out).config == sf.EncoderConfig()
