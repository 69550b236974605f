"""`train controlnet` on the tiny random SD of conftest.py (on a 32 px canvas, as
test_lora_train runs it): the loss under the control images falls, a resumed run ends
bit-exactly where an unbroken one does, the saved folder loads and steers generation, and bad
runs are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_lora_train import PROMPT, hexagon_folder, small  # noqa: F401  (the fixture)

from latentforge import cli
from latentforge.denoisers import make_denoiser
from latentforge.errors import UserError
from latentforge.io.controlnet import load_controlnet
from latentforge.io.lora import denoiser_network
from latentforge.io.model_folder import load_diffusion_model
from latentforge.models.controlnet import ControlNet, ControlNetConfig
from latentforge.pipelines.control import Control, ControlledNetwork
from latentforge.pipelines.generate import generate
from latentforge.preprocess import preprocess
from latentforge.training.controlnet_train import ControlNetTrainConfig, train_controlnet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return hexagon_folder(tmp_path_factory.mktemp("hex") / "data", 4, 32)


def _config(model, folder, out, **kw) -> ControlNetTrainConfig:
    base = {"model": str(model), "data": f"folder:{folder}:32", "out": str(out),
            "control": "canny", "batch_size": 2, "max_steps": 4, "lr": 1e-3, "quiet": True,
            "ckpt_every": 2, "label_dropout": 0.5}  # fmt: skip
    return ControlNetTrainConfig(**{**base, **kw})


def _controls(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder's images in [-1, 1] and their canny control images in [0, 1]."""
    paths = sorted(folder.glob("*.png"))
    images = [Image.open(p).convert("RGB") for p in paths]
    x = torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images])
    c = torch.stack([torch.from_numpy(np.asarray(preprocess(i, "canny")).copy()).permute(2, 0, 1)
                     for i in images])  # fmt: skip
    return x.float() / 127.5 - 1, c.float() / 255


def _eval_loss(model, net: ControlNet, images, controls, draws: int = 8) -> float:
    """The controlled denoiser's loss on `images` under PROMPT, over fixed noise draws."""
    controlled = ControlledNetwork(denoiser_network(model), [net], [False])
    denoiser = make_denoiser(controlled, model.meta.parameterization)
    ctx, mask = model.text_encoder.encode([PROMPT] * len(images))
    cond = {"context": ctx, "context_mask": mask, "control_image_0": controls,
            "control_scale": torch.ones(len(images), 1)}  # fmt: skip
    x0 = model.encode(images)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [denoiser.loss(x0, g, **cond).mean() for _ in range(draws)]
    return torch.stack(losses).mean().item()


def test_loss_falls_and_the_folder_loads(small, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = _config(small, data, out, max_steps=16, lr=2e-3, fp16=True, sample_every=16)
    assert train_controlnet(cfg) == 0
    assert (out / "samples" / "step-0000016.png").is_file()
    model = load_diffusion_model(small)
    images, controls = _controls(data)
    unet = denoiser_network(model)
    start = ControlNet.from_unet(unet, ControlNetConfig(unet.config, embedding_channels=(16, 32)))
    net, meta = load_controlnet(out)
    assert meta.controlnet["preprocess"] == "canny" and meta.training["step"] == 16
    assert all(v.dtype == torch.float16 for v in load_file(out / "model.safetensors").values())
    assert next(net.parameters()).dtype == torch.float32
    before = _eval_loss(model, start, images, controls)
    after = _eval_loss(model, net, images, controls)
    assert after < 0.9 * before, (before, after)
    # the saved ControlNet steers the pipeline: other images than the model's own
    plain = generate(model, prompts=[PROMPT], num=1, seed=0, steps=4)
    steered = generate(model, prompts=[PROMPT], num=1, seed=0, steps=4,
                       controls=[Control(net, controls[:1])])  # fmt: skip
    assert steered.shape == plain.shape and not torch.allclose(steered, plain, atol=1e-3)


def test_resume_is_bit_exact(small, data, tmp_path):  # noqa: F811
    assert train_controlnet(_config(small, data, tmp_path / "a")) == 0
    assert train_controlnet(_config(small, data, tmp_path / "b", max_steps=2)) == 0
    assert train_controlnet(_config(small, data, tmp_path / "b"), resume=True) == 0
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["controlnet_mid_block.weight"].abs().max() > 0  # it learned: not the zero init


def test_bad_runs_are_one_line(small, data, tmp_path, capsys):  # noqa: F811
    with pytest.raises(UserError, match="--control 'depth'"):
        train_controlnet(_config(small, data, tmp_path / "x", control="depth"))
    with pytest.raises(UserError, match="gives 64px"):
        train_controlnet(_config(small, data, tmp_path / "x", data=f"folder:{data}:64"))
    with pytest.raises(UserError, match="needs 2 widths"):
        train_controlnet(_config(small, data, tmp_path / "x", embedding_channels=(8, 16, 32)))
    args = ["train", "controlnet", "--model", str(small), "--data", f"folder:{data}:32",
            "--control", "depth", "--out", str(tmp_path / "y"), "--quiet"]  # fmt: skip
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "latentforge: error: --control 'depth': choose one of canny, none, scribble, sketch"
    ]
