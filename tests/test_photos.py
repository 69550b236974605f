"""The photos data spec: deterministic crops of bundled photographs, the held-out stream from
scikit-learn's two sample images only, clear errors."""

import numpy as np
import pytest
import torch

from latentforge.data import load_dataset, parse_spec
from latentforge.errors import UserError
from latentforge.photos.dataset import HELDOUT, TRAIN, Photo, load_photo


def test_training_crops_are_a_function_of_index_and_seed():
    a, b = load_dataset("photos:32", seed=0), load_dataset("photos:32", seed=0)
    c = load_dataset("photos:32", seed=1)
    assert len(a) == 100_000 and a.procedural
    for i in (0, 7, 99_999):
        item = a[i]
        assert item["image"].shape == (3, 32, 32) and item["label"] == -1
        assert item["caption"].startswith("a ")
        assert torch.equal(item["image"], b[i]["image"])
    assert all(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(4))
    images = torch.stack([a[i]["image"] for i in range(64)])
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.2
    # every training photo is drawn, none of the held-out ones
    drawn = {a.crop(i)[0] for i in range(400)}
    assert drawn == set(TRAIN) and not drawn & set(HELDOUT)


def test_heldout_stream_is_sklearns_photos_on_a_grid():
    from sklearn.datasets import load_sample_images

    ds = load_dataset("photos:64:heldout", seed=5)
    assert not ds.procedural and len(ds) == 2 * 12 * 19  # 427 x 640 photos, stride 32
    china = load_sample_images().images[0]
    assert np.array_equal(ds.crop(0)[1], china[:64, :64])
    assert np.array_equal(ds.crop(1)[1], china[:64, 32:96])
    assert torch.equal(ds[3]["image"], load_dataset("photos:64:heldout", seed=0)[3]["image"])
    assert len(load_dataset("photos:64:10:heldout")) == 10
    assert {p.package for p in HELDOUT} == {"sklearn"} and {p.package for p in TRAIN} == {"skimage"}


@pytest.mark.parametrize("spec", ["photos:8", "photos:300", "photos:64:0", "photos:64:x",
                                  "photos:64:10:20"])  # fmt: skip
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(UserError, match="photos"):
        load_dataset(spec)


def test_spec_options_and_a_missing_package():
    assert parse_spec("photos") == ("photos", {"resolution": 64})
    assert parse_spec("photos:128:heldout") == ("photos", {"resolution": 128, "heldout": True})
    with pytest.raises(UserError, match=r"pip install 'latentforge\[photos\]'"):
        load_photo(Photo("no_such_package_here", "x.png", "", ""))
