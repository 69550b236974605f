"""LoRA loading against diffusers: the tiny random SD of conftest.py (`sd_folder`, imported as
`native`), random LoRAs made by PEFT and saved by diffusers' `save_lora_weights`, the same LoRAs
rewritten with kohya's keys (diffusers- and LDM-named), each fused by latentforge and by
diffusers' `load_lora_weights` + `fuse_lora`: the U-Net and text-encoder weights and outputs
agree to 1e-5. The targets include the resnets' 3x3 convs (LoCon) and SD 1.x's 1x1-conv proj_in
(a linear-shaped LoRA on a conv weight), with lora_alpha != rank so the scaling is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from latentforge.errors import UserError  # noqa: E402
from latentforge.io import ldm  # noqa: E402
from latentforge.io.lora import LoraSpec, apply_loras, remove_loras  # noqa: E402
from latentforge.io.model_folder import load_diffusion_model  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # conv1: LoCon 3x3
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
TOL = 1e-5


def _pipe(sd_folder: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _make_lora(sd_folder: Path, out: Path, seed: int, rank: int, alpha: float) -> Path:
    """A random LoRA on the U-Net and text encoder, saved by diffusers as PEFT made it."""
    from peft.utils import get_peft_model_state_dict

    pipe = _pipe(sd_folder)
    torch.manual_seed(seed)
    configs = {}
    for part, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        configs[part] = peft.LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False
        )
        getattr(pipe, part).add_adapter(configs[part])
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
    )
    return out / "pytorch_lora_weights.safetensors"


def _to_kohya(peft_file: Path, out: Path, alpha: float, ldm_names=None) -> Path:
    """The same LoRA with kohya's keys (lora_unet_*, lora_te_*, .alpha); `ldm_names` maps our
    U-Net module names to the original LDM ones."""
    kohya = {}
    for key, t in load_file(peft_file).items():
        part, _, rest = key.partition(".")
        name, _, half = rest.rpartition(".lora_")
        half = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[half]
        if part == "unet":
            name = ldm_names(name) if ldm_names else name
            base = f"lora_unet_{name.replace('.', '_')}"
        else:
            name = name if name.startswith("text_model.") else f"text_model.{name}"
            base = f"lora_te_{name.replace('.', '_')}"
        kohya[f"{base}.{half}"] = t
        kohya[f"{base}.alpha"] = torch.tensor(float(alpha))
    save_file(kohya, out)
    return out


@pytest.fixture(scope="module")
def loras(sd_folder, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    a = _make_lora(sd_folder, d / "a", seed=1, rank=4, alpha=8.0)
    b = _make_lora(sd_folder, d / "b", seed=2, rank=2, alpha=1.0)
    return {"a": a, "b": b, "kohya_a": _to_kohya(a, d / "a_kohya.safetensors", 8.0)}


@pytest.fixture(scope="module")
def model(native):
    return load_diffusion_model(native)


def _reference(sd_folder: Path, files: list[Path], scales: list[float]):
    """diffusers' fused pipeline: load_lora_weights each, set_adapters(scales), fuse, unload."""
    pipe = _pipe(sd_folder)
    names = [f"l{i}" for i in range(len(files))]
    for f, name in zip(files, names, strict=True):
        pipe.load_lora_weights(f.parent, weight_name=f.name, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=scales)
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipe.unload_lora_weights()
    return pipe


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _compare(model, pipe) -> None:
    """Every weight and the outputs of both networks within TOL."""
    ours_unet, ours_text = model.denoiser.model, model.text_encoder.model
    for ours, ref in ((ours_unet, pipe.unet), (ours_text, pipe.text_encoder)):
        want = ref.state_dict()
        got = ours.state_dict()
        assert set(got) == set(want)
        worst = max(_max_diff(got[k], want[k]) for k in want)
        assert worst <= TOL, worst
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    ids = torch.randint(0, 512, (2, 77), generator=g)
    with torch.no_grad():
        diff = _max_diff(ours_unet(x, t, context=ctx), pipe.unet(x, t, ctx).sample)
        assert diff <= TOL, diff
        text = _max_diff(ours_text(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state)
        assert text <= TOL, text


@pytest.fixture(scope="module")
def reference_a(sd_folder, loras):
    """diffusers with LoRA a fused at 0.8."""
    return _reference(sd_folder, [loras["a"]], [0.8])


@pytest.mark.parametrize("which", ["a", "kohya_a"], ids=["peft", "kohya"])
def test_lora_matches_diffusers(model, reference_a, loras, which):
    before = {k: v.clone() for k, v in model.denoiser.model.state_dict().items()}
    applied = apply_loras(model, [f"{loras[which]}:0.8"])
    try:
        assert applied.labels == [f"{loras[which].stem}:0.8"]
        assert set(applied.saved) == {"unet", "text_encoder"}
        fused = model.denoiser.model.state_dict()
        assert max(_max_diff(fused[k], before[k]) for k in before) > 1e-2  # it did change them
        _compare(model, reference_a)
    finally:
        remove_loras(model, applied)
    after = model.denoiser.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # restored bit for bit


def test_two_loras_with_scales(model, sd_folder, loras):
    applied = apply_loras(model, [LoraSpec(loras["a"], 0.7), LoraSpec(loras["b"], -0.4)])
    try:
        _compare(model, _reference(sd_folder, [loras["a"], loras["b"]], [0.7, -0.4]))
    finally:
        remove_loras(model, applied)


def test_kohya_ldm_names(model, loras, tmp_path):
    """kohya files from LDM-named checkpoints (lora_unet_input_blocks_1_1_...) land on the same
    layers as the diffusers-named ones."""
    config = model.denoiser.model.config
    ldm_file = _to_kohya(
        loras["a"], tmp_path / "ldm.safetensors", 8.0,
        lambda n: ldm.unet_key_to_ldm(f"{n}.weight", config).removesuffix(".weight"),
    )  # fmt: skip
    assert any("input_blocks" in k for k in load_file(ldm_file))
    got = []
    for f in (ldm_file, loras["kohya_a"]):
        applied = apply_loras(model, [f])
        got.append({k: v.clone() for k, v in model.denoiser.model.state_dict().items()})
        remove_loras(model, applied)
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def test_bad_files_are_one_line_errors(model, loras, tmp_path):
    good = load_file(loras["kohya_a"])
    stray = {
        **good,
        "lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 4),
        "junk": torch.zeros(1),
    }
    with pytest.raises(UserError, match=r"2 key\(s\) match no layer.*junk.*lora_unet_nowhere"):
        apply_loras(model, [_write(tmp_path / "stray.safetensors", stray)])
    loha = {"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)}
    with pytest.raises(UserError, match="not supported: LoHa"):
        apply_loras(model, [_write(tmp_path / "loha.safetensors", loha)])
    lokr = {"lora_unet_conv_in.lokr_w1": torch.zeros(4, 4)}
    with pytest.raises(UserError, match="not supported: LoKr"):
        apply_loras(model, [_write(tmp_path / "lokr.safetensors", lokr)])
    half = {k: v for k, v in good.items() if not k.endswith("lora_up.weight")}
    with pytest.raises(UserError, match="has no up weight"):
        apply_loras(model, [_write(tmp_path / "half.safetensors", half)])
    key = next(k for k in good if k.endswith("lora_down.weight"))
    wrong = {**good, key: torch.zeros(4, 3)}
    with pytest.raises(UserError, match="delta for a"):
        apply_loras(model, [_write(tmp_path / "wrong.safetensors", wrong)])
    meta = {"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": {"to_q": 2}})}
    with pytest.raises(UserError, match="alpha_pattern"):
        apply_loras(model, [_write(tmp_path / "p.safetensors", load_file(loras["a"]), meta)])
    with pytest.raises(UserError, match="pickles are refused"):
        apply_loras(model, [tmp_path / "x.pt"])
    with pytest.raises(UserError, match="not found"):
        apply_loras(model, [tmp_path / "missing.safetensors"])
    # nothing was applied by any of the failures
    ref = load_diffusion_model(model.path)
    assert all(
        torch.equal(v, ref.denoiser.model.state_dict()[k])
        for k, v in model.denoiser.model.state_dict().items()
    )


@pytest.mark.parametrize(
    ("text", "path", "scale"),
    [("a.safetensors", "a.safetensors", 1.0), ("a.safetensors:0.5", "a.safetensors", 0.5),
     ("C:/x/a.safetensors:-1e-1", "C:/x/a.safetensors", -0.1), ("dir/a:b.safetensors",
     "dir/a:b.safetensors", 1.0)],
)  # fmt: skip
def test_spec_parse(text, path, scale):
    spec = LoraSpec.parse(text)
    assert (spec.path, spec.scale) == (Path(path), scale)


def test_merge_then_export_matches_diffusers(native, reference_a, loras, tmp_path, capsys):
    """`lora merge` writes a model folder with the LoRA fused in; `export --format diffusers`
    of it is diffusers' fused pipeline."""
    from latentforge import cli

    merged, exported = tmp_path / "merged", tmp_path / "exported"
    assert cli.main(["lora", "merge", str(native), f"{loras['a']}:0.8", "--out", str(merged)]) == 0
    assert "into text_encoder, unet" in capsys.readouterr().out
    meta = json.loads((merged / "model.json").read_text())
    assert meta["source"]["loras"] == [f"{loras['a'].stem}:0.8"]
    assert cli.main(["export", str(merged), "--format", "diffusers", str(exported)]) == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    for part in ("unet", "text_encoder"):
        want, got = getattr(reference_a, part).state_dict(), getattr(pipe, part).state_dict()
        assert max(_max_diff(got[k], want[k]) for k in want) <= TOL
    # a merged folder is refused as a target, the original is untouched
    assert cli.main(["lora", "merge", str(native), str(loras["a"]), "--out", str(merged)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_api_load_with_loras(native, reference_a, loras):
    import latentforge

    pipe = latentforge.load(native, device="cpu", loras=[f"{loras['kohya_a']}:0.8"])
    assert pipe.loras == [f"{loras['kohya_a'].stem}:0.8"]
    _compare(pipe.model, reference_a)


def test_cli_lora_errors_are_one_line(native, loras, tmp_path, capsys):
    from latentforge import cli

    bad = _write(tmp_path / "bad.safetensors", {"lora_unet_x.lora_down.weight": torch.ones(1, 1)})
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    for argv in (
        ["img2img", str(image), "a cat", "--model", str(native), "--lora", str(bad)],
        ["lora", "merge", str(native), str(bad), "--out", str(tmp_path / "m")],
        ["lora", "merge", str(native), str(tmp_path / "nope.safetensors"), "--out",
         str(tmp_path / "m")],
    ):  # fmt: skip
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("latentforge: error: "), err
    assert not (tmp_path / "m").exists()


def test_generate_lora_and_from_png(native, loras, tmp_path, capsys):
    """generate --lora fuses the file and records NAME:SCALE; --from-png finds the file next to
    the image or through --lora, and reproduces the image exactly."""
    import shutil

    import numpy as np
    from PIL import Image

    from latentforge import cli
    from latentforge.io.images import read_png_metadata

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    common = ["--model", str(native), "--steps", "2", "--width", "32", "--height", "32",
              "--quiet"]  # fmt: skip
    first, plain = tmp_path / "a.png", tmp_path / "plain.png"
    argv = ["generate", "a red cat", *common, "--lora", f"{loras['kohya_a']}:0.8", "--out"]
    assert cli.main([*argv, str(first)]) == 0
    assert cli.main(["generate", "a red cat", *common, "--out", str(plain)]) == 0
    assert json.loads(read_png_metadata(first)["loras"]) == ["a_kohya:0.8"]
    assert not np.array_equal(pixels(first), pixels(plain))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(first, moved / "a.png")
    again = ["generate", "--from-png", str(moved / "a.png"), "--model", str(native), "--quiet"]
    assert cli.main([*again, "--out", str(tmp_path / "b.png")]) == 2
    assert "a_kohya.safetensors next to the image" in capsys.readouterr().err
    assert (
        cli.main([*again, "--lora", str(loras["kohya_a"]), "--out", str(tmp_path / "c.png")]) == 0
    )
    shutil.copy(loras["kohya_a"], moved / "a_kohya.safetensors")
    assert cli.main([*again, "--out", str(tmp_path / "d.png")]) == 0
    for name in ("c.png", "d.png"):
        assert np.array_equal(pixels(tmp_path / name), pixels(first))


def test_eval_prompts_with_a_lora(native, loras, capsys):
    """`eval prompts --lora`: the fused model is what is scored, and the JSON records it."""
    from latentforge import cli

    argv = ["eval", "prompts", "--prompts", "shapes-seen", "--per-prompt", "1", "--steps", "1",
            "--model", str(native), "--json", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main([*argv, "--lora", f"{loras['kohya_a']}:0.8"]) == 0
    fused = json.loads(capsys.readouterr().out)
    assert plain["settings"]["loras"] == [] and fused["settings"]["loras"] == ["a_kohya:0.8"]
    # what the random LoRA does to the tiny random model shows in what the analyser reads
    found = [r["found"] for r in plain["per_prompt"]], [r["found"] for r in fused["per_prompt"]]
    assert found[0] != found[1]
    assert cli.main([*argv, "--lora", "missing.safetensors"]) == 2
    assert capsys.readouterr().err.startswith("latentforge: error:")


def test_an_lcm_lora_samples_as_diffusers_lcm_scheduler(native, reference_a, loras):
    """LCM-LoRA's recipe (Luo et al. 2023): a LoRA on a plain SD model, sampled by the LCM
    scheduler at guidance 1. Ours: --lora FILE, the `lcm` sampler and spacing; the same final
    latents as diffusers' pipeline with LCMScheduler, from the same noise and step noise.
    (The consistency boundary scalings diffusers applies are c_skip < 1e-8 at the LCM grid's
    timesteps, so the plain model's x0 is the consistency output to well within 1e-4.)"""
    import latentforge
    from latentforge import sampling
    from latentforge.pipelines.common import conditioning, make_sigmas

    ours = latentforge.load(native, device="cpu", loras=[f"{loras['a']}:0.8"]).model
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = reference_a.scheduler
    reference_a.scheduler = diffusers.LCMScheduler.from_config(scheduler.config)
    try:
        want = reference_a(
            "a red cat", num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(),
            height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(9),
        ).images  # fmt: skip
    finally:
        reference_a.scheduler = scheduler
    sigmas = make_sigmas(ours, 4, "lcm")
    denoiser, cond = conditioning(ours, 1, prompts=["a red cat"], guidance=1.0)
    x = noise * (1 + float(sigmas[0]) ** 2) ** 0.5  # VP latents -> VE
    got = sampling.sample("lcm", denoiser, x, sigmas, cond=cond,
                          generator=torch.Generator().manual_seed(9))  # fmt: skip
    assert _max_diff(got, want) <= 1e-4, _max_diff(got, want)
    assert _max_diff(got, noise) > 0.1
