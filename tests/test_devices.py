"""Devices and weight precision: --device / --dtype for every pipeline, the CLI and the server.
The CPU cases run everywhere; the CUDA ones run only where CUDA is (CI has none) and compare
against the CPU with the tolerance they state."""

import pytest
import torch

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.io.model_folder import check_dtype, load_diffusion_model, resolve_device
from latentforge.pipelines.generate import generate
from latentforge.pipelines.img2img import img2img
from latentforge.pipelines.inpaint import inpaint
from latentforge.pipelines.interpolate import walk

CUDA = torch.cuda.is_available()


def test_device_names(monkeypatch):
    monkeypatch.delenv("LATENTFORGE_DEVICE", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else resolve_device("auto").type)
    monkeypatch.setenv("LATENTFORGE_DEVICE", "cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    for bad in ("gpu0", "tpu", "cuda:x"):
        with pytest.raises(UserError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(UserError, match="unknown dtype"):
        check_dtype("fp8", torch.device("cpu"))
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        check_dtype("fp16", torch.device("cpu"))


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tiny_digits_model, tmp_path, capsys):
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    argv = ["sample", "--model", str(tiny_digits_model), "--out", str(tmp_path / "x.png")]
    assert main([*argv, "--device", "cuda"]) == 2
    assert main([*argv, "--device", "cpu", "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["latentforge", "latentforge"]
    assert "CUDA is not available" in err[0] and "fp16 needs a GPU" in err[1]


@pytest.fixture(scope="module")
def models(tiny_digits_model):
    fp32 = load_diffusion_model(tiny_digits_model, device="cpu", dtype="fp32")
    bf16 = load_diffusion_model(tiny_digits_model, device="cpu", dtype="bf16")
    return fp32, bf16


def test_bf16_weights_are_bf16_and_sample_close_to_fp32(models):
    fp32, bf16 = models
    assert bf16.dtype == "bf16" and bf16.device == torch.device("cpu")
    assert {p.dtype for p in bf16.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.denoiser.parameters()} == {torch.float32}
    kw = {"labels": [3], "num": 2, "steps": 3, "seed": 1}
    a, b = generate(fp32, **kw), generate(bf16, **kw)
    assert b.dtype == torch.float32 and b.device == torch.device("cpu")
    # bf16 keeps 8 bits of mantissa: the same images but for rounding; this untrained model
    # saturates most pixels at -1 or 1, where a rounding can flip one (0.4% of them here)
    diff = (a - b).abs()
    assert diff.mean() < 0.05 and (diff > 0.5).float().mean() < 0.02


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_pipeline_runs_with_an_explicit_device_and_dtype(models, dtype):
    model = models[0] if dtype == "fp32" else models[1]
    images = torch.zeros(2, *model.output_shape)
    masks = torch.ones(2, 1, *model.output_shape[1:])
    kw = {"labels": [5], "steps": 2, "seed": 0}
    outs = [
        generate(model, num=2, **kw),
        img2img(model, images, strength=1.0, num=2, **kw),
        inpaint(model, images, masks, num=2, **kw),
        walk(model, 0, 1, frames=2, steps=2, labels_a=5, labels_b=5),
    ]
    for out in outs:
        assert out.device.type == "cpu" and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.shape[-2:] == model.output_shape[1:]
    assert torch.equal(outs[0], outs[1])  # strength 1 is text-to-image bit for bit, bf16 too


def test_server_runs_on_the_configured_device_and_dtype(models_dir_tiny):
    from latentforge.server import ServerConfig, create_app
    from latentforge.server.store import ModelStore

    store = ModelStore(models_dir=models_dir_tiny, device="cpu", dtype="bf16")
    model = store.get("digits")
    assert model.dtype == "bf16" and model.device == torch.device("cpu")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        create_app(ServerConfig(models_dir=models_dir_tiny, device="cpu", dtype="fp16"))


@pytest.fixture(scope="module")
def models_dir_tiny(tiny_digits_model, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("device-models")
    shutil.copytree(tiny_digits_model, root / "digits")
    return root


# ----- CUDA (skipped without it) -------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_matches_the_cpu(tiny_digits_model, dtype):
    """The seed's noise is drawn on the CPU and moved, so CUDA samples the CPU's image: within
    1e-3 in fp32 (TF32 off), 5e-2 mean in fp16 / bf16."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = load_diffusion_model(tiny_digits_model, device="cpu")
    gpu = load_diffusion_model(tiny_digits_model, device="cuda", dtype=dtype)
    kw = {"labels": [7], "num": 2, "steps": 4, "seed": 3, "sampler": "euler_ancestral"}
    a, b = generate(cpu, **kw), generate(gpu, **kw)
    assert b.device.type == "cpu"
    if dtype == "fp32":
        assert (a - b).abs().max() < 1e-3
    else:
        assert (a - b).abs().mean() < 5e-2
