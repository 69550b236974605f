"""Textual-inversion embeddings (io/embeddings.py, CLIPTextEncoder.add_embedding).

Oracle: diffusers' `load_textual_inversion` on the same tiny random CLIP and character
tokenizer; the trigger word must give the same hidden states (1e-6), from diffusers' own file
format and from A1111's (`emb_params`, trigger word = file stem).
"""

from __future__ import annotations

import shutil
from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")

from conftest import char_tokenizer  # noqa: E402
from test_prompt_syntax import clip_encoder, save_tiny_clip  # noqa: E402

from latentforge.cli import main  # noqa: E402
from latentforge.errors import UserError  # noqa: E402
from latentforge.io.embeddings import load_embeddings, read_embedding, split_spec  # noqa: E402
from latentforge.io.model_folder import LoadedModel, default_model_dir, read_model_meta  # noqa: E402

WIDTH = 32  # the tiny CLIP's hidden size


@pytest.fixture(autouse=True)
def _seeded():
    """Random embeddings the same whatever ran before (an unlucky draw through the tiny random
    model can overflow, so a test's outcome must not depend on the order of the tests)."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


class _Loader(diffusers.loaders.TextualInversionLoaderMixin):
    """The mixin alone, on a tokenizer and text encoder of our choosing."""

    hf_device_map = None
    components: ClassVar[dict] = {}


def _reference(clip_dir, file, token: str | None, prompt: str) -> torch.Tensor:
    """diffusers: load the embedding file, convert the prompt, encode (77 tokens)."""
    import transformers

    tokenizer = char_tokenizer()
    text_encoder = transformers.CLIPTextModel.from_pretrained(clip_dir / "text_encoder")
    loader = _Loader()
    loader.load_textual_inversion(
        str(file), token=token, tokenizer=tokenizer, text_encoder=text_encoder
    )
    ids = tokenizer(
        loader.maybe_convert_prompt(prompt, tokenizer),
        padding="max_length", max_length=77, truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state[0]


def _model(clip_dir, path=None) -> LoadedModel:
    """A text model stand-in: the tiny CLIP as its text encoder, no denoiser."""
    model = LoadedModel(read_model_meta(default_model_dir()), path)
    model.text_encoder = clip_encoder(clip_dir)
    return model


@pytest.mark.parametrize("vectors", [1, 3])
def test_diffusers_file_matches_load_textual_inversion(clip_dir, tmp_path, vectors):
    torch.manual_seed(vectors)
    file = tmp_path / "learned_embeds.safetensors"
    shape = (WIDTH,) if vectors == 1 else (vectors, WIDTH)  # diffusers saves one vector as (D,)
    save_file({"<cat-toy>": torch.randn(shape)}, file)
    model = _model(clip_dir)
    assert load_embeddings(model, [str(file)]) == ["<cat-toy>"]
    prompt = "a photo of <cat-toy> on a mat"
    ours, _ = model.text_encoder.encode_prompts([prompt])
    ref = _reference(clip_dir, file, None, prompt)
    torch.testing.assert_close(ours[0], ref, atol=1e-6, rtol=0)
    plain, _ = model.text_encoder.encode_prompts(["a photo of  on a mat"])
    assert (ours[0] - plain[0]).abs().max() > 1e-2  # the trigger word does something


def test_a1111_file_is_named_by_its_stem_and_matches(clip_dir, tmp_path):
    torch.manual_seed(0)
    file = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": torch.randn(2, WIDTH)}, file)
    model = _model(clip_dir)
    assert load_embeddings(model, [str(file)]) == ["mystyle"]
    prompt = "mystyle, a red circle"
    ours, _ = model.text_encoder.encode_prompts([prompt])
    torch.testing.assert_close(
        ours[0], _reference(clip_dir, file, "mystyle", prompt), atol=1e-6, rtol=0
    )


def test_file_colon_token_renames_the_trigger(clip_dir, tmp_path):
    file = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": torch.randn(1, WIDTH)}, file)
    assert split_spec(f"{file}:neon") == (file, "neon")
    assert split_spec(str(file)) == (file, None)
    model = _model(clip_dir)
    assert load_embeddings(model, [f"{file}:neon"]) == ["neon"]
    ours, _ = model.text_encoder.encode_prompts(["neon"])
    torch.testing.assert_close(
        ours[0], _reference(clip_dir, file, "neon", "neon"), atol=1e-6, rtol=0
    )


def test_weights_and_windows_treat_an_embedding_as_one_word(clip_dir, tmp_path):
    file = tmp_path / "trio.safetensors"
    save_file({"emb_params": torch.randn(3, WIDTH)}, file)
    model = _model(clip_dir)
    load_embeddings(model, [str(file)])
    enc = model.text_encoder
    # 73 letters, then the 3-vector trigger: it does not fit, so it opens the next window whole
    chunks = enc.prompt_chunks(" ".join(["a"] * 73) + " trio")
    assert [sum(att) - 2 for _, _, att in chunks] == [73, 3]
    _, weights, _ = enc.prompt_chunks("(trio:1.5) a")[0]
    assert weights[:6] == [1.0, 1.5, 1.5, 1.5, 1.0, 1.0]


def test_embeddings_folder_beside_the_model_and_embeddings_dir(clip_dir, tmp_path):
    folder = tmp_path / "model"
    (folder / "embeddings").mkdir(parents=True)
    save_file({"emb_params": torch.randn(1, WIDTH)}, folder / "embeddings" / "alpha.safetensors")
    save_file({"emb_params": torch.randn(1, WIDTH)}, folder / "embeddings" / "beta.safetensors")
    (folder / "embeddings" / "notes.txt").write_text("not an embedding")
    assert load_embeddings(_model(clip_dir, folder)) == ["alpha", "beta"]
    other = tmp_path / "elsewhere"
    shutil.copytree(folder / "embeddings", other)
    assert load_embeddings(_model(clip_dir), folder=other) == ["alpha", "beta"]
    assert load_embeddings(_model(clip_dir, tmp_path / "no-embeddings")) == []
    with pytest.raises(UserError, match="embeddings folder not found"):
        load_embeddings(_model(clip_dir), folder=tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "tensors", "message"),
    [
        ("style.pt", None, "pickle embeddings .* refused; use the .safetensors"),
        ("wide.safetensors", {"emb_params": torch.zeros(1, 768)}, "width 32 .*SD 1.x"),
        ("sdxl.safetensors", {"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8)}, "SDXL"),
        ("two.safetensors", {"a": torch.zeros(8), "b": torch.zeros(8)}, "found 2"),
        ("many.safetensors", {"emb_params": torch.zeros(76, WIDTH)}, "1 to 75"),
        ("ints.safetensors", {"emb_params": torch.zeros(1, WIDTH, dtype=torch.int32)}, "float"),
        ("nan.safetensors", {"emb_params": torch.full((1, WIDTH), float("nan"))}, "NaN"),
    ],
)
def test_bad_files_are_one_line_errors(clip_dir, tmp_path, name, tensors, message):
    file = tmp_path / name
    if tensors is None:
        file.write_bytes(b"\x80\x02}q\x00.")  # a pickle
    else:
        save_file(tensors, file)
    with pytest.raises(UserError, match=message) as e:
        load_embeddings(_model(clip_dir), [str(file)])
    assert "\n" not in str(e.value)


def test_a_trigger_that_is_already_a_token_is_refused(clip_dir, tmp_path):
    file = tmp_path / "spark.safetensors"
    save_file({"emb_params": torch.randn(1, WIDTH)}, file)
    model = _model(clip_dir)
    load_embeddings(model, [str(file)])
    with pytest.raises(UserError, match=r"'spark' is already a token.*FILE:TOKEN"):
        load_embeddings(model, [str(file)])
    with pytest.raises(UserError, match="'a' is already a token"):  # a character token
        load_embeddings(model, [f"{file}:a"])


def test_minilm_models_refuse_embeddings(tmp_path):
    import latentforge

    file = tmp_path / "x.safetensors"
    save_file({"emb_params": torch.randn(1, 384)}, file)
    with pytest.raises(UserError, match="need a CLIP text encoder"):
        latentforge.load("default", device="cpu", embeddings=[file])
    assert read_embedding(file)[0] == "x"


def test_cli_embedding_on_an_sd_model(native, tmp_path, capsys):
    """img2img --embedding on the tiny imported SD model; a bad one exits 2 in one line."""
    from PIL import Image

    model = tmp_path / "model"
    shutil.copytree(native, model)
    (model / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, WIDTH)}, model / "embeddings" / "shiny.safetensors")
    save_file({"<toy>": torch.randn(WIDTH)}, tmp_path / "learned_embeds.safetensors")
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(image)
    argv = ["img2img", str(image), "(shiny:1.2) <toy> BREAK a cat", "--model", str(model),
            "--steps", "2", "--embedding", str(tmp_path / "learned_embeds.safetensors"),
            "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").is_file()
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    save_file({"emb_params": torch.randn(1, 768)}, bad)
    assert main([*argv[:-1], "--embedding", str(bad), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentforge: error:") and "\n" not in err


def test_cli_generate_loads_the_models_embeddings_folder(native, tmp_path):
    """generate: the model's embeddings/ folder and --embedding, as img2img."""
    model = tmp_path / "model"
    shutil.copytree(native, model)
    (model / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, WIDTH)}, model / "embeddings" / "shiny.safetensors")
    save_file({"<toy>": torch.randn(WIDTH)}, tmp_path / "learned_embeds.safetensors")
    argv = ["generate", "(shiny:1.2) <toy>", "--model", str(model), "--steps", "2", "--quiet",
            "--embedding", str(tmp_path / "learned_embeds.safetensors")]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "out.png")]) == 0
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02}q\x00.")
    assert main([*argv, "--embedding", str(bad), "--out", str(tmp_path / "o.png")]) == 2
