"""A1111's prompt syntax (prompt_syntax.py) and chunked, weighted encoding (models/text.py).

The parser table holds A1111's own documented examples (`parse_prompt_attention`'s doctests)
with their exact weights. Encoding runs on a tiny random CLIP with a character-level tokenizer
(one token per letter: chunk boundaries are countable) and on the default model's MiniLM; the
plain-prompt path `encode` (unchanged) is the oracle for prompts without syntax.
"""

from __future__ import annotations

import pytest
import torch

from latentforge.errors import UserError
from latentforge.prompt_syntax import escape, parse_prompt, plain_text

pytest.importorskip("transformers")

from conftest import char_tokenizer, tiny_clip

from latentforge.models.text import CLIPTextEncoder

# (prompt, sections of (text, weight)); weights exactly as A1111's float arithmetic gives them
TABLE = [
    ("normal text", [[("normal text", 1.0)]]),
    ("an (important) word", [[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]),
    ("\\(literal\\]", [[("(literal]", 1.0)]]),
    ("(unnecessary)(parens)", [[("unnecessaryparens", 1.1)]]),
    # A1111's example closes its open "(" at the end implicitly; here the ")" is written
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)",
        [
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ]
        ],
    ),
    ("((word))", [[("word", 1.2100000000000002)]]),
    ("[word]", [[("word", 1 / 1.1)]]),
    ("[[word]]", [[("word", 1 / 1.1 / 1.1)]]),
    ("(word:1.3)", [[("word", 1.3)]]),
    ("(word: 0.5 )", [[("word", 0.5)]]),
    ("(word:-1)", [[("word", -1.0)]]),
    ("a (word:1.0) b", [[("a word b", 1.0)]]),
    ("a \\(b\\) \\\\ c", [[("a (b) \\ c", 1.0)]]),
    ("a\\b", [[("ab", 1.0)]]),  # a backslash before anything else is dropped, as in A1111
    ("time 10:30", [[("time 10:30", 1.0)]]),
    ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
    ("BREAK b", [[("", 1.0)], [("b", 1.0)]]),
    ("a\nBREAK\n(b)", [[("a", 1.0)], [("b", 1.1)]]),
    ("BREAKFAST break", [[("BREAKFAST break", 1.0)]]),
    ("", [[("", 1.0)]]),
]


@pytest.mark.parametrize(("prompt", "expected"), TABLE)
def test_parse_table(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "where"),
    [
        ("(unbalanced", "unbalanced '(' at character 1"),
        ("a (((house:1.3)) [on]", "unbalanced '(' at character 3"),
        ("a) b", "unbalanced ')' at character 2"),
        ("x]", "unbalanced ']' at character 2"),
        ("(a]", "']' at character 3 closes '(' opened at character 1"),
        ("[cat:dog:0.5]", "':' at character 5 inside [ ]"),
        ("[cat|dog]", "'|' at character 5 inside [ ]"),
        ("(a:1.2.3)", "weight '1.2.3'"),
    ],
)
def test_malformed_prompts_are_one_line_errors(prompt, where):
    with pytest.raises(UserError, match=r"^prompt: ") as e:
        parse_prompt(prompt)
    assert where in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["a (photo) of [me]", "x\\y :) (", "f(x) = [1, 2]\\"])
def test_escaped_text_reads_back_as_itself(text):
    assert parse_prompt(escape(text)) == [[(text, 1.0)]]


def test_plain_text_drops_the_syntax():
    assert (
        plain_text("a (red:1.3) circle BREAK [blue] \\(square\\)") == "a red circle blue (square)"
    )


# ----- encoding ---------------------------------------------------------------------------------
def save_tiny_clip(folder):
    """A tiny random CLIP text model and a character tokenizer, saved as model folders."""
    tiny_clip().save_pretrained(folder / "text_encoder")
    char_tokenizer().save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def clip_encoder(folder) -> CLIPTextEncoder:
    return CLIPTextEncoder(folder / "text_encoder", folder / "tokenizer")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return clip_encoder(clip_dir)


@pytest.fixture(scope="module")
def minilm():
    from latentforge.models.text import MiniLMEncoder

    return MiniLMEncoder()


def _letters(enc, chunk) -> str:
    """A chunk's prompt tokens as text (char tokenizer: one letter or ',' per token)."""
    ids, _, attention = chunk
    toks = enc.tokenizer.convert_ids_to_tokens(ids[1 : sum(attention) - 1])
    return "".join(t.replace("</w>", "") for t in toks)


def test_plain_prompts_encode_bit_equal_to_the_plain_path(clip, minilm):
    prompts = ["a small red circle above a blue square", "", "a green triangle, on a pink"]
    for enc in (clip, minilm):
        h0, m0 = enc.encode(prompts)
        enc._prompt_cache.clear()
        h1, m1 = enc.encode_prompts(prompts)
        assert torch.equal(h0, h1) and torch.equal(m0, m1)


@pytest.mark.parametrize("weighted", ["a small (red:1.0) circle", "(a small (red:1.0) circle:1)"])
def test_weight_one_is_exactly_the_plain_word(clip, minilm, weighted):
    for enc in (clip, minilm):
        assert torch.equal(
            enc.encode_prompts([weighted])[0], enc.encode_prompts(["a small red circle"])[0]
        )


def test_chunks_of_75_tokens_with_start_end_and_padding(clip):
    for n, chunks in [(1, 1), (75, 1), (76, 2), (150, 2), (151, 3)]:
        got = clip.prompt_chunks(" ".join(["a"] * n))
        assert len(got) == chunks
        assert all(len(ids) == 77 and ids[0] == 512 for ids, _, _ in got)
        assert sum(sum(att) - 2 for _, _, att in got) == n
        hidden, mask = clip.encode_prompts([" ".join(["a"] * n), "b"])
        assert hidden.shape == (2, 77 * chunks, 32) and bool(mask.all())  # SD's CLIP: no mask


def test_long_prompt_states_are_its_chunks_encoded_alone(clip):
    """Each window is encoded on its own, with its own start and end tokens."""
    first, second = " ".join(["a"] * 75), "b c d"
    hidden, _ = clip.encode_prompts([f"{first} {second}"])
    alone, _ = clip.encode_prompts([first, second])
    torch.testing.assert_close(hidden[0], alone.flatten(0, 1), atol=1e-6, rtol=0)


def test_break_forces_a_new_chunk(clip):
    assert [_letters(clip, c) for c in clip.prompt_chunks("ab BREAK cd")] == ["ab", "cd"]
    assert [_letters(clip, c) for c in clip.prompt_chunks("BREAK cd")] == ["", "cd"]
    hidden, _ = clip.encode_prompts(["ab BREAK cd"])
    alone, _ = clip.encode_prompts(["ab", "cd"])
    torch.testing.assert_close(hidden[0], alone.flatten(0, 1), atol=1e-6, rtol=0)


def test_a_full_chunk_ends_at_a_comma_near_its_end(clip):
    # 70 tokens, a comma, then 10: the window fills 4 tokens after the comma, those move on
    got = [_letters(clip, c) for c in clip.prompt_chunks(" ".join("a" * 70) + ", " + "b" * 10)]
    assert got == ["a" * 70 + ",", "b" * 10]
    # a comma more than 20 tokens back: the window is cut where it fills
    got = [_letters(clip, c) for c in clip.prompt_chunks(" ".join("a" * 40) + ", " + "b" * 40)]
    assert got == ["a" * 40 + "," + "b" * 34, "b" * 6]


def test_minilm_windows_are_30_tokens(minilm):
    """The default model's 32-token window: 30 prompt tokens between [CLS] and [SEP]."""
    prompt = ", ".join(["a small red circle"] * 12)  # 5 tokens each (with the comma), 59
    chunks = minilm.prompt_chunks(prompt)
    assert [sum(att) for _, _, att in chunks] == [32, 31]
    hidden, mask = minilm.encode_prompts([prompt, "a blue square"])
    assert hidden.shape == (2, 64, 384)
    assert mask.sum(1).tolist() == [63, 5]  # the short prompt padded with masked-out zeros
    assert not hidden[1, 32:].any()


def test_too_long_prompts_are_refused(clip):
    with pytest.raises(UserError, match="longer than 32 windows"):
        clip.encode_prompts([" ".join(["a"] * 75 * 33)])


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the states cross-attention sees (mask True)."""
    return hidden[mask].mean()


def test_weights_scale_the_token_and_restore_the_mean(clip, minilm):
    for enc, token in ((clip, 3), (minilm, 3)):  # "a b (c) d": c is the third prompt token
        plain, mask = enc.encode_prompts(["a b c d"])
        for w in (1.5, 0.5):
            weighted, _ = enc.encode_prompts([f"a b (c:{w}) d"])
            torch.testing.assert_close(_mean(weighted[0], mask[0]), _mean(plain[0], mask[0]))
            # every state is the plain one times one factor; the weighted token's times w more
            ratio = weighted[0, 0, 0] / plain[0, 0, 0]
            torch.testing.assert_close(weighted[0, token], plain[0, token] * ratio * w)
            torch.testing.assert_close(weighted[0, 1], plain[0, 1] * ratio)
            grows = weighted[0, token].norm() / weighted[0, 1].norm()
            assert (grows > plain[0, token].norm() / plain[0, 1].norm()) == (w > 1)


def test_pad_context_pads_with_empty_windows(clip, minilm):
    hidden, mask = clip.encode_prompts(["ab"])
    padded, pmask = clip.pad_context(hidden, mask, 154)
    empty, _ = clip.encode_prompts([""])
    assert torch.equal(padded[0, :77], hidden[0]) and torch.equal(padded[0, 77:], empty[0])
    assert bool(pmask.all())
    hidden, mask = minilm.encode_prompts(["ab"])
    padded, pmask = minilm.pad_context(hidden, mask, 64)
    assert not padded[0, 32:].any() and not pmask[0, 32:].any()


def test_unet_cross_attention_takes_long_masked_contexts():
    """A context padded with masked-out zeros gives the same U-Net output (any length)."""
    from latentforge.models.presets import unet_preset
    from latentforge.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(unet_preset("tiny", cross_attention_dim=16)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    ctx, mask = torch.randn(2, 32, 16), torch.ones(2, 32, dtype=torch.bool)
    long_ctx = torch.cat([ctx, torch.zeros(2, 122, 16)], 1)
    long_mask = torch.cat([mask, torch.zeros(2, 122, dtype=torch.bool)], 1)
    with torch.no_grad():
        short = net(x, t, context=ctx, context_mask=mask)
        long = net(x, t, context=long_ctx, context_mask=long_mask)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_default_model_takes_long_weighted_prompts_and_negatives():
    """End to end: a two-window prompt with weights, a one-window negative (guidance pads
    it), regions planned from the prompt (padded to the prompt's length)."""
    import latentforge

    pipe = latentforge.load("default", device="cpu")
    long = ", ".join(["a small (red:1.2) circle above a [blue] square"] * 4)
    for prompt, negative in ((long, "a green triangle"), ("a red circle", long)):
        out = pipe(prompt, negative=negative, steps=2, output_type="pt")
        assert out.shape[0] == 1 and bool(torch.isfinite(out).all())
    with pytest.raises(UserError, match="unbalanced"):
        pipe("a (red circle", steps=1)
