"""FID's Inception-v3 against torch-fidelity's on the same random weights.

torch-fidelity is installed without its dependencies (torchvision stays out): the README's test
line does `pip install --no-deps torch-fidelity`, and only its Inception module is imported,
not the package's __init__ (which imports torchvision)."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.errors import UserError
from latentforge.metrics import inception


def _reference_extractor():
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.fail("torch-fidelity is missing: pip install --no-deps torch-fidelity==0.4.0")
    if "torch_fidelity" not in sys.modules:  # its package import pulls in torchvision
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights with BatchNorm statistics that keep activations in range, as a .pth."""
    g = torch.Generator().manual_seed(0)
    net = inception.FIDInception()
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            state[k] = v
        elif k.endswith(("running_mean", "bias")):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # convolutions: variance-preserving
            fan_in = v[0].numel()
            state[k] = torch.randn(v.shape, generator=g) * (2 / fan_in) ** 0.5
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(state, path)
    return path


def test_features_equal_torch_fidelity_on_random_weights(weights):
    """Same file, same 8-bit images (one 64 px, resized by TF1's bilinear rule as both do): the
    2048 pool features agree within float32 rounding."""
    ref = _reference_extractor()("inception-v3-compat", ["2048"],
                                 feature_extractor_weights_path=str(weights))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    ours = inception.InceptionFeatures(weights, resize="tf")(images)
    with torch.no_grad():
        theirs = ref(inception.to_uint8(images).to(torch.uint8))[0].double().numpy()
    assert ours.shape == (2, 2048) and np.abs(theirs).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_clean_resize_is_pil_bicubic_per_channel():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 20, 30, generator=g) * 2 - 1
    x = inception.prepare(images, "clean")
    assert x.shape == (1, 3, 299, 299)
    channel = inception.to_uint8(images)[0, 1].numpy().astype(np.float32)
    pil = np.asarray(Image.fromarray(channel, mode="F").resize((299, 299), Image.BICUBIC))
    np.testing.assert_allclose(x[0, 1].numpy(), (pil - 128) / 128, atol=1e-6)
    # the three rules differ, and a 299 px image is never resized
    tf, torch_rule = inception.prepare(images, "tf"), inception.prepare(images, "torch")
    assert not torch.allclose(x, tf) and not torch.allclose(tf, torch_rule)
    same = torch.rand(1, 3, 299, 299, generator=g) * 2 - 1
    assert torch.equal(inception.prepare(same, "clean"), inception.prepare(same, "tf"))


def test_bad_weights_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        inception.load_inception(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable weights file"):
        inception.load_inception(bad)
    small = tmp_path / "small.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, small)
    with pytest.raises(UserError, match="do not match"):
        inception.load_inception(small)
    with pytest.raises(UserError, match="unknown resize"):
        inception.prepare(torch.zeros(1, 3, 8, 8), "nearest")


def test_eval_fid_with_inception_features(weights, tmp_path, capsys):
    """--features inception:FILE end to end on tiny sets; the second run reads the reference
    features from the cache (keyed by the weights file and the resize rule)."""
    import json

    from latentforge.cli import main

    argv = ["eval", "fid", "--ref", "digits:16", "--gen", "shapes:16", "--n", "4", "--json",
            "--quiet", "--features", f"inception:{weights}", "--resize", "tf",
            "--cache-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["resize"] == "tf" and first["fid"] > 0 and not first["ref_cached"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["ref_cached"] and again["fid"] == first["fid"]
