"""`train lora` on the tiny random SD of conftest.py (imported as `native`, on a 32 px canvas):
the loss of the images trained on falls, a resumed run ends bit-exactly where an unbroken one
does, and the saved file (kohya and diffusers keys) fuses, in latentforge and in diffusers'
`load_lora_weights` + `fuse_lora`, into the same weights. `hexagon_folder` draws the data (and
the shapes demonstration's, docs/lora.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from latentforge.errors import UserError
from latentforge.io.checkpoint import write_json_atomic
from latentforge.io.lazy import open_safetensors
from latentforge.io.lora import apply_loras
from latentforge.io.model_folder import load_diffusion_model, read_model_meta
from latentforge.training.lora_train import LORA_FILE, LoraTrainConfig, train_lora

PROMPT = "a red sks hexagon"


def hexagon(size: int, rng: random.Random) -> Image.Image:
    """A filled regular hexagon (a random colour, size, place and turn) on a plain background."""
    bg = tuple(rng.randrange(40, 216) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    r = rng.uniform(0.2, 0.34) * size
    cx, cy = (rng.uniform(r + 1, size - r - 1) for _ in range(2))
    turn = rng.uniform(0, math.pi / 3)
    points = [(cx + r * math.cos(turn + k * math.pi / 3), cy + r * math.sin(turn + k * math.pi / 3))
              for k in range(6)]  # fmt: skip
    fill = tuple(255 - c for c in bg)  # far from the background
    ImageDraw.Draw(img).polygon(points, fill=fill)
    return img


def hexagon_folder(folder: Path, n: int, size: int, caption: str = PROMPT, seed: int = 0) -> Path:
    """n hexagon images with `caption` in .txt sidecars (the folder:PATH convention)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        hexagon(size, rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def small(native, tmp_path_factory) -> Path:
    """The tiny SD model on a 32 px canvas (16x16 latents), as test_sd_pipeline runs it, sampling
    in 4 steps (DreamBooth's class images)."""
    dst = tmp_path_factory.mktemp("small") / "model"
    shutil.copytree(native, dst)
    meta = read_model_meta(dst)
    meta = meta.with_defaults(steps=4).replace(
        data=dataclasses.replace(meta.data, resolution=16),
        latent=dataclasses.replace(meta.latent, image_resolution=32),
    )
    write_json_atomic(dst / "model.json", meta.to_json())
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return hexagon_folder(tmp_path_factory.mktemp("hex") / "data", 4, 32)


def _config(small: Path, folder: Path, out: Path, **kw) -> LoraTrainConfig:
    base = {"model": str(small), "data": f"folder:{folder}:32", "out": str(out), "batch_size": 2,
            "max_steps": 4, "lr": 1e-2, "quiet": True, "ckpt_every": 2}  # fmt: skip
    return LoraTrainConfig(**{**base, **kw})


def _eval_loss(model, images: torch.Tensor, draws: int = 8) -> float:
    """The denoiser's loss on `images` under PROMPT, averaged over fixed noise draws."""
    ctx, mask = model.text_encoder.encode([PROMPT] * len(images))
    x0 = model.encode(images)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [model.denoiser.loss(x0, g, context=ctx, context_mask=mask).mean()
                  for _ in range(draws)]  # fmt: skip
    return torch.stack(losses).mean().item()


def test_loss_falls(small, data, tmp_path):
    from latentforge.data import load_dataset

    assert train_lora(_config(small, data, tmp_path / "run", max_steps=12, lr=2e-2)) == 0
    images = torch.stack([load_dataset(f"folder:{data}:32")[i]["image"] for i in range(4)])
    model = load_diffusion_model(small)
    before = _eval_loss(model, images)
    apply_loras(model, [tmp_path / "run" / LORA_FILE])
    after = _eval_loss(model, images)
    assert after < 0.9 * before, (before, after)


def test_resume_is_bit_exact(small, data, tmp_path):
    kw = {"train_text_encoder": True, "lora_target": "conv"}
    assert train_lora(_config(small, data, tmp_path / "a", **kw)) == 0
    assert train_lora(_config(small, data, tmp_path / "b", max_steps=2, **kw)) == 0
    assert train_lora(_config(small, data, tmp_path / "b", **kw), resume=True) == 0
    a, b = load_file(tmp_path / "a" / LORA_FILE), load_file(tmp_path / "b" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("lora_te_") for k in a) and any("conv1" in k for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_up.weight"))
    state = json.loads(open_safetensors(tmp_path / "a" / LORA_FILE)[1]["latentforge.training"])
    assert state["step"] == 4 and state["rank"] == 4


def _weights(unet: torch.nn.Module, text: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**unet.state_dict(), **{f"te.{k}": v for k, v in text.state_dict().items()}}


def test_saved_file_loads_in_both_formats(small, data, sd_folder, tmp_path):
    """The same run saved with kohya's and diffusers' keys: both fuse into the same weights in
    latentforge, and in diffusers."""
    diffusers = pytest.importorskip("diffusers")
    kw = {"train_text_encoder": True, "lora_target": "conv", "max_steps": 2}
    for fmt in ("kohya", "diffusers"):
        assert train_lora(_config(small, data, tmp_path / fmt, format=fmt, **kw)) == 0
    fused = {}
    for fmt in ("kohya", "diffusers"):
        model = load_diffusion_model(small)
        apply_loras(model, [tmp_path / fmt / LORA_FILE])
        fused[fmt] = _weights(model.denoiser.model, model.text_encoder.model)
    base = load_diffusion_model(small).denoiser.model.state_dict()
    assert max((fused["kohya"][k] - base[k]).abs().max() for k in base) > 0
    assert all(
        torch.allclose(fused["kohya"][k], v, atol=1e-6) for k, v in fused["diffusers"].items()
    )
    for fmt in ("kohya", "diffusers"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
        pipe.load_lora_weights(tmp_path / fmt, weight_name=LORA_FILE)
        pipe.fuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
        want = _weights(pipe.unet, pipe.text_encoder)
        worst = max((fused[fmt][k] - want[k]).abs().max().item() for k in want)
        assert worst <= 1e-5, (fmt, worst)


def test_dreambooth_prior_preservation_runs(small, data, tmp_path):
    cfg = _config(small, data, tmp_path / "db", max_steps=2, instance_prompt="a sks hexagon",
                  class_prompt="a hexagon", num_class_images=2)  # fmt: skip
    assert train_lora(cfg) == 0 and (tmp_path / "db" / LORA_FILE).is_file()


def test_bad_runs_are_one_line(small, data, tmp_path, capsys):
    from latentforge import cli

    with pytest.raises(UserError, match="gives 64px"):
        train_lora(_config(small, data, tmp_path / "x", data=f"folder:{data}:64"))
    argv = ["train", "lora", "--model", str(small), "--data", f"folder:{data}:32", "--out",
            str(tmp_path / "y"), "--max-steps", "1", "--batch-size", "2", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0 and (tmp_path / "y" / LORA_FILE).is_file()
    assert cli.main(argv) == 2  # checkpoints there: --resume or a new --out
    assert "already holds checkpoints" in capsys.readouterr().err
