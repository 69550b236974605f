"""`latentforge distill`: LCM and progressive distillation on the tiny digits model (conftest)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.guidance import DenoiserWrapper
from latentforge.io.model_folder import ConsistencyDenoiser, load_diffusion_model
from latentforge.pipelines.generate import generate
from latentforge.training.distill import DistillConfig, DistillTrainer, distill


def _cfg(teacher, out, **kw) -> DistillConfig:
    base = {"max_steps": 2, "batch_size": 4, "ckpt_every": 2, "warmup_steps": 0, "quiet": True,
            "cache_latents": False, "cache_text": False, "data": "digits", "lr": 1e-3}  # fmt: skip
    return DistillConfig(model=str(teacher), out=str(out), **{**base, **kw})


def _trainer(teacher, out, **kw) -> DistillTrainer:
    cfg = _cfg(teacher, out, **kw)
    return DistillTrainer(dataclasses.replace(cfg, data=cfg.data or "digits"))


def _calls(model) -> list[int]:
    calls: list[int] = []
    model.denoiser.model.register_forward_pre_hook(lambda _, a: calls.append(a[0].shape[0]))
    return calls


def test_student_starts_as_the_teacher(tiny_digits_model, tmp_path):
    """Zero-initialised guidance projection: the student's network computes the teacher's
    conditional prediction at every guidance scale before the first step (the teacher clamps
    its x0 to the pixel range; the student trains on the raw one)."""
    trainer = _trainer(tiny_digits_model, tmp_path)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 3.0, 40.0])
    labels = torch.tensor([1, 2, 3])
    want = trainer.teacher(x, sigma, class_labels=labels)
    got = trainer.denoiser(x, sigma, class_labels=labels, guidance=torch.tensor([1.0, 3, 7]))
    assert torch.allclose(got.clamp(-1, 1), want, atol=1e-6)
    assert got.abs().max() > 1  # unclamped


def test_lcm_cli_makes_a_one_pass_few_step_model(tiny_digits_model, tmp_path):
    out = tmp_path / "lcm"
    args = ["distill", "--model", str(tiny_digits_model), "--out", str(out), "--method", "lcm",
            "--steps", "2", "--max-steps", "2", "--batch-size", "4", "--ckpt-every", "2",
            "--data", "digits", "--quiet"]  # fmt: skip
    assert main(args) == 0
    model = load_diffusion_model(out)
    assert isinstance(model.denoiser, ConsistencyDenoiser)
    defaults = model.defaults
    assert (defaults.sampler, defaults.steps, defaults.guidance) == ("lcm", 2, 1.0)
    assert model.meta.guidance_embedding["time_cond_proj_dim"] == 256
    calls = _calls(model)
    images = generate(model, labels=[3, 5], num=2, seed=0)
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1
    assert calls == [2, 2]  # one call a step for both images: guidance is folded in


def test_resume_is_exact(tiny_digits_model, tmp_path):
    """Two steps, stop, resume to four == four straight (weights, EMA target, optimizer)."""
    straight, split = tmp_path / "a", tmp_path / "b"
    assert distill(_cfg(tiny_digits_model, straight, max_steps=4)) == 0
    assert distill(_cfg(tiny_digits_model, split, max_steps=2)) == 0
    assert distill(_cfg(tiny_digits_model, split, max_steps=4), resume=True) == 0
    for name in ("model", "ema", "optimizer"):
        a = load_file(straight / "checkpoints/step-0000004" / f"{name}.safetensors")
        b = load_file(split / "checkpoints/step-0000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_progressive_student_step_reproduces_two_teacher_steps(tiny_digits_model, tmp_path):
    """On one fixed batch (same images, noise, levels and scales each step) the student's loss
    (its one DDIM step against two guided teacher steps) falls by orders of magnitude."""
    trainer = _trainer(tiny_digits_model, tmp_path, method="progressive", from_steps=4,
                       to_steps=2, lr=2e-3)  # fmt: skip
    trainer.teacher = _Memo(trainer.teacher)  # the targets are fixed: compute them once
    batch = trainer.batch(0, 0)

    def loss() -> torch.Tensor:
        return trainer.compute_loss(batch, torch.Generator().manual_seed(0))

    first = loss().item()
    for _ in range(100):
        trainer.opt.zero_grad()
        loss().backward()
        trainer.opt.step()
    assert first > 0.1 and loss().item() < first / 1000, (first, loss().item())


class _Memo(DenoiserWrapper):
    """The teacher, remembering its outputs per input (a fixed batch repeats them)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.memo = {}

    def forward(self, x, sigma, **cond):
        key = (tuple(x.shape), float(x.double().sum()), float(sigma.double().sum()))
        if key not in self.memo:
            self.memo[key] = self.inner(x, sigma, **cond)
        return self.memo[key]


def test_progressive_samples_in_k_steps(tiny_digits_model, tmp_path):
    """8 -> 2 steps is two halving rounds (round-0 the 4-step student); the result samples in
    2 DDIM steps of one call each."""
    out = tmp_path / "pd"
    cfg = _cfg(tiny_digits_model, out, method="progressive", from_steps=8, to_steps=2)
    assert distill(cfg) == 0
    first = load_diffusion_model(out / "round-0")
    assert first.defaults.steps == 4
    model = load_diffusion_model(out)
    assert (model.defaults.sampler, model.defaults.steps, model.defaults.guidance) == (
        "ddim", 2, 1.0,
    )  # fmt: skip
    assert model.meta.init_from["folder"] == str((out / "round-0").resolve())
    calls = _calls(model)
    images = generate(model, labels=[1], num=1, seed=0)
    assert images.shape == (1, 1, 16, 16) and calls == [1, 1]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "gan"}, "unknown --method"),
        ({"method": "progressive", "from_steps": 6, "to_steps": 4}, "power of 2"),
        ({"guidance_min": 3.0, "guidance_max": 2.0}, "guidance range"),
        ({"ddim_timesteps": 30}, "must divide 1000"),
    ],
)
def test_bad_settings_are_one_line(tiny_digits_model, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        distill(_cfg(tiny_digits_model, tmp_path, **kw))


def test_refuses_a_consistency_teacher(tiny_digits_model, tmp_path):
    student = tmp_path / "lcm"
    assert distill(_cfg(tiny_digits_model, student)) == 0
    with pytest.raises(UserError, match="consistency model"):
        distill(_cfg(student, tmp_path / "again"))


# ----- the embedded few-step model ---------------------------------------------------------------
def test_fast_is_embedded_and_generates(tmp_path):
    """`--model fast`: the shipped LCM (lcm, <= 4 steps, guidance 3 as a network input),
    sharing the default's VAE; one U-Net call a step, and --from-png reproduces its image."""
    from PIL import Image

    from latentforge.io.images import read_png_metadata
    from latentforge.io.model_folder import assets_dir, model_dir, read_model_meta

    fast = model_dir("fast")
    assert fast == assets_dir() / "fast"
    meta = read_model_meta(fast)
    d = meta.defaults
    assert (d.sampler, d.guidance) == ("lcm", 3.0) and d.steps <= 4
    assert meta.guidance_embedding["guidance"] == 3.0
    assert meta.latent.vae == "../default/vae" and not (fast / "vae").exists()
    model = load_diffusion_model("fast")
    calls = _calls(model)
    generate(model, prompts=["a large red circle in the center on a gray background"], num=1)
    assert calls == [1] * d.steps
    prompt = "a large yellow star in the center on a blue background"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", prompt, "--model", "fast", "--out", str(a), "--quiet"]) == 0
    args = ["generate", "--from-png", str(a), "--model", "fast", "--out", str(b), "--quiet"]
    assert main(args) == 0
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.size == (64, 64) and ia.tobytes() == ib.tobytes()
    png = read_png_metadata(a)
    assert (png["sampler"], png["steps"]) == ("lcm", str(d.steps))


def test_only_embedded_models_share_a_vae(tmp_path):
    """A copied `fast` folder may not reach outside itself for its VAE."""
    import shutil

    from latentforge.io.model_folder import model_dir, read_model_meta

    shutil.copy(model_dir("fast") / "model.json", tmp_path / "model.json")
    with pytest.raises(UserError, match="only the embedded models share a VAE"):
        read_model_meta(tmp_path)


def test_the_server_lists_fast():
    from latentforge.server.store import ModelStore

    store = ModelStore()
    assert "fast" in store.names()
    assert store.resolve("fast")[1].name == "fast"


def test_fast_takes_the_guidance_scale_as_an_input_in_one_pass(monkeypatch):
    """`--guidance G` on a guidance-embedding model sets the embedded scale (one call a step, no
    CFG pass); its default, 3, is what the network uses when a call gives no scale."""
    from latentforge.io.model_folder import load_diffusion_model, model_dir
    from latentforge.pipelines import common
    from latentforge.pipelines.generate import generate

    model = load_diffusion_model(model_dir("fast"))
    calls = []
    model.denoiser.register_forward_hook(lambda *a: calls.append(1))
    default = generate(model, prompts=["a red circle"], num=2, seed=0, steps=2)
    assert len(calls) == 2 and model.meta.sampling.guidance == 3.0
    five = generate(model, prompts=["a red circle"], num=2, seed=0, steps=2, guidance=5.0)
    assert len(calls) == 4 and (five - default).abs().max() > 0.1
    plain = common.conditioning

    def without_scale(*args, **kwargs):
        denoiser, cond = plain(*args, **kwargs)
        cond.pop("guidance")
        return denoiser, cond

    monkeypatch.setattr(common, "conditioning", without_scale)
    assert torch.equal(generate(model, prompts=["a red circle"], num=2, seed=0, steps=2), default)
