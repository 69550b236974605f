"""Datasets: digits, procedural shapes (records, rendering, captions, parsing), folders."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.data import (
    DIGIT_WORDS,
    FolderDataset,
    ImageDataset,
    load_dataset,
    parse_spec,
)
from latentforge.errors import UserError
from latentforge.shapes.dataset import ShapesDataset
from latentforge.shapes.scenes import (
    BACKGROUND_COLOURS,
    HELD_OUT,
    PALETTE,
    POSITIONS,
    RELATIONS,
    canonical_caption,
    is_held_out,
    parse_prompt,
    render_shapes,
    sample_caption,
    shapes_record,
)

ATTRS = ("shape", "colour", "size", "position")


def _attrs(record: dict) -> dict:
    return {
        "objects": [{k: o[k] for k in ATTRS} for o in record["objects"]],
        "background": record["background"],
        "relation": record["relation"],
    }


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("digits", ("digits", {"resolution": 16})),
        ("digits:32", ("digits", {"resolution": 32})),
        ("shapes", ("shapes", {"resolution": 64})),
        ("shapes:32", ("shapes", {"resolution": 32})),
        ("shapes:64:500:holdout", ("shapes", {"resolution": 64, "length": 500, "holdout": True})),
        ("folder:/no/such/dir", ("folder", {"path": "/no/such/dir", "resolution": 64})),
        ("folder:/no/such/dir:128", ("folder", {"path": "/no/such/dir", "resolution": 128})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "mnist", "cifar10:32", "shapes:8", "shapes:abc", "digits:x", "folder:", "/tmp"]
)
def test_bad_specs_raise_user_error(spec):
    with pytest.raises(UserError, match="spec"):
        parse_spec(spec)


def test_unknown_spec_message():
    with pytest.raises(
        UserError,
        match=r"unknown data spec 'mnist'; use digits\[:RES\], folder:PATH, wds:SHARDS\[:RES\], "
        r".*shapes",
    ):
        load_dataset("mnist")


def test_resolution_kwarg_conflict():
    assert load_dataset("shapes", resolution=32).resolution == 32
    with pytest.raises(UserError, match="resolution"):
        load_dataset("shapes:64", resolution=32)


# ---------------------------------------------------------------- digits


def test_digits():
    ds = load_dataset("digits")
    assert isinstance(ds, ImageDataset)
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (1797, 1, 16, 10)
    assert ds.class_names == [str(d) for d in range(10)]
    item = ds[7]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["caption"] == f"a handwritten {DIGIT_WORDS[item['label']]}"
    images = torch.stack([ds[i]["image"] for i in range(0, len(ds), 50)])
    assert images.min() >= -1 and images.max() <= 1 and images.max() > 0.9
    assert {ds[i]["label"] for i in range(len(ds))} == set(range(10))
    assert torch.equal(load_dataset("digits")[7]["image"], item["image"])
    assert load_dataset("digits:32")[0]["image"].shape == (1, 32, 32)
    with pytest.raises(IndexError):
        ds[1797]


def test_default_collate():
    loader = torch.utils.data.DataLoader(load_dataset("shapes:16", seed=3), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].tolist() == [-1] * 4 and len(batch["caption"]) == 4


# ---------------------------------------------------------------- shapes


def test_shapes_deterministic_and_seeded():
    ds = load_dataset("shapes")
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (100_000, 3, 64, 0)
    a, b = ds[5], load_dataset("shapes")[5]
    assert a["image"].shape == (3, 64, 64)
    assert a["image"].min() >= -1 and a["image"].max() <= 1
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    other = load_dataset("shapes", seed=1)
    assert any(not torch.equal(ds[i]["image"], other[i]["image"]) for i in range(5))
    assert shapes_record(5, seed=0) == ds.record(5)
    assert shapes_record(5, seed=0) != shapes_record(5, seed=1)
    assert len(load_dataset("shapes:32:10")) == 10


def test_shapes_records_are_consistent():
    counts = Counter()
    for i in range(400):
        rec = shapes_record(i, seed=2)
        objs = rec["objects"]
        counts[len(objs)] += 1
        assert 1 <= len(objs) <= 2
        assert rec["background"] in BACKGROUND_COLOURS
        assert rec["background"] not in {o["colour"] for o in objs}
        for o in objs:
            row, col = divmod(POSITIONS.index(o["position"]), 3)
            # The centre lies in its grid cell and the object stays inside the image.
            assert col / 3 <= o["cx"] / 64 < (col + 1) / 3
            assert row / 3 <= o["cy"] / 64 < (row + 1) / 3
            assert o["radius"] <= o["cx"] <= 64 - o["radius"]
            assert o["radius"] <= o["cy"] <= 64 - o["radius"]
        if len(objs) == 1:
            assert rec["relation"] is None
            continue
        a, b = objs
        assert a["position"] != b["position"]
        reach = a["radius"] + b["radius"]
        assert abs(a["cx"] - b["cx"]) >= reach or abs(a["cy"] - b["cy"]) >= reach
        assert rec["relation"] in RELATIONS
        (ra, ca), (rb, cb) = (divmod(POSITIONS.index(o["position"]), 3) for o in objs)
        if rec["relation"] == "above":
            assert ca == cb and ra < rb and a["cy"] < b["cy"]
        elif rec["relation"] == "below":
            assert ca == cb and ra > rb and a["cy"] > b["cy"]
        elif rec["relation"] == "left of":
            assert ra == rb and ca < cb and a["cx"] < b["cx"]
        elif rec["relation"] == "right of":
            assert ra == rb and ca > cb and a["cx"] > b["cx"]
        else:
            assert ra != rb and ca != cb
    assert counts[1] > 100 and counts[2] > 100


def test_canonical_caption_round_trips():
    for i in range(300):
        rec = shapes_record(i, seed=1)
        assert rec["caption"] == canonical_caption(rec)
        assert parse_prompt(rec["caption"]) == _attrs(rec)
        # Case and spacing do not matter.
        assert parse_prompt("  " + rec["caption"].upper().replace(" ", "   ")) == _attrs(rec)


def test_sampled_captions_are_truthful():
    """Every template, synonyms included, states only true attributes; canonical >= 50%."""
    canonical = 0
    texts = set()
    for i in range(400):
        rec = shapes_record(i)
        text = sample_caption(rec, i)
        texts.add(text)
        canonical += text == rec["caption"]
        parsed, truth = parse_prompt(text), _attrs(rec)
        assert len(parsed["objects"]) == len(truth["objects"]), text
        for got, want in zip(parsed["objects"], truth["objects"], strict=True):
            assert {"shape", "colour"} <= set(got), text
            assert all(want[k] == v for k, v in got.items()), text
        assert parsed["background"] in (None, truth["background"]), text
        if len(truth["objects"]) == 2:
            assert parsed["relation"] == truth["relation"], text
    assert 0.5 <= canonical / 400 <= 0.65
    assert len(texts) > 380


def test_parse_prompt_free_text():
    p = parse_prompt("A tiny Crimson disc at the upper-left, blue backdrop!")
    assert p == {
        "objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "top left"}],
        "background": "blue",
        "relation": None,
    }
    p = parse_prompt("a big yellow star above a green square")
    assert p["objects"] == [
        {"shape": "star", "colour": "yellow", "size": "large"},
        {"shape": "square", "colour": "green"},
    ]
    assert p["relation"] == "above" and p["background"] is None
    p = parse_prompt("a purple triangle to the right of an orange circle on a grey background")
    assert p["relation"] == "right of" and p["background"] == "gray"
    assert parse_prompt("a red circle in the top left of the image")["objects"] == [
        {"shape": "circle", "colour": "red", "position": "top left"}
    ]
    assert parse_prompt("hello world") == {"objects": [], "background": None, "relation": None}
    assert parse_prompt("") == {"objects": [], "background": None, "relation": None}


def test_holdout_exclusion():
    assert is_held_out({"objects": [{"colour": "red", "shape": "star"}]})
    ds = load_dataset("shapes:16:holdout")
    seen = set()
    for i in range(500):
        rec = ds.record(i)
        assert not is_held_out(rec)
        seen |= {(o["colour"], o["shape"]) for o in rec["objects"]}
    assert not seen & HELD_OUT and len(seen) > 20
    # Records that were fine are unchanged; only rejected ones are redrawn.
    plain = ShapesDataset(16)
    kept = [i for i in range(100) if not is_held_out(plain.record(i))]
    assert all(plain.record(i) == ds.record(i) for i in kept)
    # Without opting in, held-out pairs do appear.
    assert any(is_held_out(plain.record(i)) for i in range(100))


def test_render_colours():
    for i in range(60):
        rec = shapes_record(i, seed=4, resolution=64)
        img = np.asarray(render_shapes(rec)).astype(int)
        assert img.shape == (64, 64, 3)
        bg = BACKGROUND_COLOURS[rec["background"]]
        for y, x in [(0, 0), (0, 63), (63, 0), (63, 63)]:
            assert np.abs(img[y, x] - bg).max() <= 2, (i, rec)
        for o in rec["objects"]:
            pixel = img[int(o["cy"]), int(o["cx"])]
            assert np.abs(pixel - PALETTE[o["colour"]]).max() <= 2, (i, o)
        # Anti-aliased: edges hold blended values, not just the two flat colours.
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert len(colours) > 1 + len(rec["objects"])
    # The same scene at another resolution.
    rec = shapes_record(3, resolution=64)
    assert render_shapes(rec, 32).size == (32, 32)


# ---------------------------------------------------------------- folder


def _png(path, colour, size=(20, 12), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)


def test_folder_dataset(tmp_path):
    _png(tmp_path / "cats" / "a.png", (255, 0, 0))
    _png(tmp_path / "cats" / "b.jpg", (0, 255, 0), fmt="JPEG")
    _png(tmp_path / "dogs" / "c.png", (0, 0, 255), size=(8, 30))
    Image.new("LA", (10, 10), (0, 0)).save(tmp_path / "dogs" / "d.png")  # transparent
    (tmp_path / "dogs" / "c.txt").write_text("a blue dog\n")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "notes.md").write_text("ignored")
    rows = [{"file_name": "cats/a.png", "text": "a red cat"}, {"file_name": "cats/b.jpg"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    with pytest.warns(UserWarning, match=r"skipping 1 unreadable .*broken\.png"):
        ds = load_dataset(f"folder:{tmp_path}:16")
    assert isinstance(ds, FolderDataset)
    assert (len(ds), ds.channels, ds.resolution) == (4, 3, 16)
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2
    items = [ds[i] for i in range(len(ds))]
    assert [it["label"] for it in items] == [0, 0, 1, 1]
    assert [it["caption"] for it in items] == ["a red cat", "", "a blue dog", ""]
    for it in items:
        assert it["image"].shape == (3, 16, 16)
    assert torch.allclose(items[0]["image"][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(items[3]["image"], torch.ones(3, 16, 16))  # alpha over white

    # A file that breaks after validation: warn and serve the next one.
    (tmp_path / "cats" / "b.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="could not read"):
        item = ds[1]
    assert item["caption"] == "a blue dog"


def test_folder_unlabelled_with_sidecars(tmp_path):
    _png(tmp_path / "x.png", (10, 20, 30))
    (tmp_path / "x.txt").write_text("  a dark square  ")
    _png(tmp_path / "sub" / "y.bmp", (0, 0, 0), fmt="BMP")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(f"folder:{tmp_path}", resolution=8)
    assert ds.num_classes == 0 and ds.class_names == []
    assert [ds[i]["label"] for i in range(2)] == [-1, -1]
    assert ds[0]["caption"] == "a dark square" and ds[1]["caption"] == ""
    assert ds[0]["image"].shape == (3, 8, 8)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="no images"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="readable"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    _png(tmp_path / "ok.png", (1, 2, 3))
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"metadata\.jsonl:1"):
        load_dataset(f"folder:{tmp_path}")
