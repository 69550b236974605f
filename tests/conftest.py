import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from latentforge.training import TrainConfig, train_diffusion


@pytest.fixture(scope="session")
def tiny_digits_model(tmp_path_factory):
    """A 2-step class-conditional digits model: right format, useless weights, made in ~1 s."""
    out = tmp_path_factory.mktemp("tiny-digits")
    cfg = TrainConfig(
        data="digits", out=str(out), cond="class", max_steps=2, batch_size=4,
        sample_every=0, quiet=True,
    )  # fmt: skip
    assert train_diffusion(cfg) == 0
    return out


# ----- a tiny random Stable Diffusion (test_sd_import.py, test_sd_pipeline.py) ------------------
# diffusers' own tiny SD test config; diffusers and transformers are imported only when used.

TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_VAE = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}
SD_SCHEDULER = {  # SD 1.x's scheduler_config.json (DDIMScheduler)
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (no zero-initialised layer can hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def tiny_clip(act: str = "quick_gelu", layers: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=520,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act=act,
    )
    return transformers.CLIPTextModel(config).eval()


def char_tokenizer():
    """A character-level CLIP tokenizer (every byte and byte</w> a token, no merges)."""
    import transformers

    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs + [256 + i for i in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny diffusers StableDiffusionPipeline folder, as save_pretrained writes it."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        unet=perturbed(diffusers.UNet2DConditionModel(**TINY_UNET), 1),
        vae=perturbed(diffusers.AutoencoderKL(**TINY_VAE), 2),
        text_encoder=tiny_clip(),
        tokenizer=char_tokenizer(),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("sd") / "diffusers"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def native(sd_folder, tmp_path_factory) -> Path:
    """sd_folder imported into a native latentforge model folder."""
    from latentforge.io.diffusers_format import import_model

    dst = tmp_path_factory.mktemp("native") / "model"
    info = import_model(sd_folder, dst)
    assert info["format"] == "diffusers" and info["text_encoder"]
    return dst


@contextlib.contextmanager
def limited_client(models_dir: Path):
    """The app in process with no workers and tight limits (one queued job, 64x64 images,
    200 kB bodies): what the hostile-input tests of each API dialect post to."""
    from fastapi.testclient import TestClient

    from latentforge.server import ServerConfig, create_app

    config = ServerConfig(models_dir=models_dir, preload=False, workers=0, max_queue=1,
                          max_image_pixels=64 * 64, max_body_bytes=200_000)  # fmt: skip
    with TestClient(create_app(config)) as c:
        yield c


@contextlib.contextmanager
def live_serve(args: list[str], log: Path, timeout: float = 90.0):
    """`latentforge serve ARGS` on a free loopback port in its own process (one thread), its
    output in `log`; yields (process, url) once /health answers, and stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "latentforge.cli", "serve", *args, "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"serve did not answer in {timeout:g} s:\n{log.read_text()}")
                time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
