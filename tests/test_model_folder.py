"""The model folder layer: ModelMeta round trips, validation, folders and PNGs of the previous
version (tests/fixtures, written before the restructure) loading and reproducing bit for bit."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.io.model_folder import (
    ModelFolder,
    ModelMeta,
    default_model_dir,
    load_diffusion_model,
    load_vae,
    read_model_meta,
    save_model_folder,
)
from latentforge.pipelines.generate import generate

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy"  # tiny folders written by the version before io/model_folder.py
PNG_BEFORE = FIXTURES / "png_before"  # PNGs written by that version's `latentforge generate`

# every folder kind the project writes: (folder, kind, task, conditioning, latent)
FOLDERS = {
    "class-pixel": ("diffusion", "generate", "class", False),
    "text-latent": ("diffusion", "generate", "text", True),
    "text-latent/vae": ("vae", "generate", None, False),
    "superres": ("diffusion", "superres", "none", False),
    "inpaint": ("diffusion", "inpaint", "class", False),
}


def _json(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_legacy_model_json_round_trips(name):
    folder = LEGACY / name
    raw = _json(folder)
    meta = read_model_meta(folder)
    kind, task, cond, latent = FOLDERS[name]
    assert (meta.kind, meta.task, meta.latent is not None) == (kind, task, latent)
    if kind == "diffusion":
        assert ModelFolder(meta).conditioning == cond
    assert meta.to_json() == raw  # nothing lost, nothing added
    assert ModelMeta.from_json(meta.to_json()) == meta


@pytest.mark.parametrize("folder", ["default", "default/vae", "upscaler"])
def test_embedded_model_json_round_trips(folder):
    path = default_model_dir().parent / folder
    raw = _json(path)
    assert read_model_meta(path).to_json() == raw


def test_typed_fields_read_what_model_json_says():
    meta = read_model_meta(default_model_dir())
    raw = _json(default_model_dir())
    assert meta.data.resolution == raw["data"]["resolution"] == 16
    assert meta.defaults.guidance_interval == (1.0, None)
    assert meta.defaults.layout == "shapes" and meta.defaults.spacing == "trailing"
    assert meta.latent.scaling_factor == raw["latent"]["scaling_factor"]
    assert meta.output_shape == (3, 64, 64) and meta.image_shape == (4, 16, 16)
    sr = read_model_meta(LEGACY / "superres")
    assert (sr.scale, sr.concat_channels, sr.defaults.noise_level) == (2, 1, 0.1)


def test_unknown_future_keys_survive_a_round_trip(tmp_path):
    raw = _json(LEGACY / "class-pixel")
    raw["lora"] = {"file": "x.safetensors", "scale": 0.8}  # a key a later version may add
    raw["data"]["aspect_buckets"] = [[64, 64]]
    raw["sampling"]["width"] = 768
    raw["latent_future"] = None
    meta = ModelMeta.from_json(raw)
    assert meta.extra["lora"]["scale"] == 0.8 and meta.defaults.extra == {"width": 768}
    assert meta.to_json() == {k: v for k, v in raw.items() if v is not None} | {
        "latent_future": None
    }
    save_model_folder(tmp_path, meta, {"w": torch.zeros(1)})
    assert _json(tmp_path) == meta.to_json()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[]", "must be an object, got a list"),
        ('{"kind": "diffusion"}', "no 'unet' section"),
        ('{"kind": "gan"}', "is not one of diffusion, vae"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("{nope", "invalid JSON"),
    ],
)
def test_malformed_model_json_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(UserError, match=message):
        read_model_meta(tmp_path)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("data", "resolution"), "64", "resolution must be an integer"),
        (("data", "channels"), 0, r"channels must be an integer in \[1, 256\]"),
        (("sampling", "steps"), -3, r"steps must be an integer in \[1, 10000\]"),
        (("sampling", "guidance_interval"), [1, 2, 3], r"guidance_interval must be \[lo, hi\]"),
        (("parameterization",), [], "'parameterization' must be an object"),
        (("task",), "paint", "task 'paint' is not one of"),
    ],
)
def test_bad_fields_name_themselves(path, value, message):
    raw = _json(LEGACY / "class-pixel")
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(UserError, match=message):
        ModelMeta.from_json(raw)


def test_a_latent_vae_reference_cannot_leave_the_folder():
    raw = _json(LEGACY / "text-latent")
    raw["latent"]["vae"] = "../../elsewhere"
    with pytest.raises(UserError, match="sub-folder"):
        ModelMeta.from_json(raw)


def test_legacy_folders_load_and_sample(tmp_path):
    model = load_diffusion_model(LEGACY / "text-latent")
    assert model.conditioning == "text" and model.vae is not None
    images = generate(model, prompts=["a red circle"], num=2, steps=2)
    assert images.shape == (2, 3, 16, 16)
    _, meta = load_vae(LEGACY / "text-latent" / "vae")
    assert meta.kind == "vae" and meta.scaling_factor > 0 and len(meta.latent_rgb) == 3
    # a copy re-saved through ModelMeta loads the same weights to the same outputs
    shutil.copytree(LEGACY / "class-pixel", tmp_path / "copy")
    again = load_diffusion_model(tmp_path / "copy")
    first = load_diffusion_model(LEGACY / "class-pixel")
    assert torch.equal(
        generate(again, labels=[3], num=1, steps=2), generate(first, labels=[3], num=1, steps=2)
    )


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize(
    "png, model",
    [
        ("default-regions.png", None),  # planned regions (the embedded model's layout)
        ("default-dpmpp.png", None),  # another sampler, a negative prompt, guidance 4
        ("default-region-ancestral.png", None),  # --region boxes, eta, an open interval
        ("legacy-class.png", "class-pixel"),  # a class model folder of the previous version
        ("legacy-text.png", "text-latent"),  # a latent text model folder of that version
    ],
)
def test_pngs_written_before_the_restructure_reproduce_bit_for_bit(tmp_path, png, model):
    """The fixtures were written on one thread of an Intel Xeon: CPU kernels split reductions
    by thread and by instruction set, so on another CPU or thread count a few values can
    differ by one level (4 of 27,336 for the ancestral fixture on an AMD EPYC at one thread,
    with the code that wrote it as with this one); the others reproduce exactly there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _reproduce(tmp_path, png, model)
    finally:
        torch.set_num_threads(threads)


def _reproduce(tmp_path, png: str, model: str | None) -> None:
    out = tmp_path / "again.png"
    args = ["generate", "--from-png", str(PNG_BEFORE / png), "--out", str(out)]
    if model:
        args += ["--model", str(LEGACY / model)]
    assert main(args) == 0
    diff = np.abs(_pixels(out).astype(int) - _pixels(PNG_BEFORE / png).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).sum())


def test_file_digest_cache_hits_misses_and_survives_a_bad_cache(tmp_path, monkeypatch):
    """Large files' digests come from the cache while size and mtime hold; a changed file is
    hashed again; an unreadable or unwritable cache only costs the hashing."""
    import hashlib
    import os

    from latentforge.io import checkpoint

    monkeypatch.setenv("LATENTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "DIGEST_CACHE_MIN_BYTES", 0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    truth = hashlib.sha256(b"a" * 1000).hexdigest()[:16]
    assert checkpoint.file_digest(f) == truth
    assert (
        json.loads((tmp_path / "cache" / "digests.json").read_text())[str(f.resolve())][-1] == truth
    )

    calls = []
    real = checkpoint._sha256_prefix
    monkeypatch.setattr(checkpoint, "_sha256_prefix", lambda p: calls.append(p) or real(p))
    assert checkpoint.file_digest(f) == truth and calls == []  # a hit: no hashing
    f.write_bytes(b"b" * 1000)  # same size: the modification time tells
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert checkpoint.file_digest(f) == hashlib.sha256(b"b" * 1000).hexdigest()[:16]
    assert len(calls) == 1
    (tmp_path / "cache" / "digests.json").write_text("[not json")
    assert checkpoint.file_digest(f) == hashlib.sha256(b"b" * 1000).hexdigest()[:16]
    monkeypatch.setenv("LATENTFORGE_CACHE", str(f))  # a file where the folder should be
    assert checkpoint.file_digest(f) == hashlib.sha256(b"b" * 1000).hexdigest()[:16]
