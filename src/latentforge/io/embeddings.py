"""Textual-inversion embeddings (Gal et al. 2022) from A1111 and diffusers files.

A1111 / kohya: `NAME.safetensors` holding `emb_params` (or `string_to_param.*`), vectors (n, D);
the trigger word is the file's stem, as A1111 has it. diffusers: `learned_embeds.safetensors`
holding one `{token: vector}`; the trigger word is that token, as `load_textual_inversion` has
it. `FILE:TOKEN` picks another trigger word. Pickles (`.pt`, `.bin`) are refused. The encoder
side (tokenizer and token table) is `TextEncoder.add_embedding` in models/text.py.

Images record the embeddings their prompts use as "TRIGGER:HASH" (`Embedding.label`; HASH: the
first 12 hex digits of the file's SHA-256, A1111's `TI hashes`), so a reader can tell when one
is missing (`used_embeddings`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import PICKLE_SUFFIXES, file_digest
from .lazy import open_safetensors
from .model_folder import LoadedModel, ModelFolder

log = logging.getLogger("latentforge")

A1111_KEYS = ("emb_params", "string_to_param.*")
MAX_VECTORS, MAX_WIDTH = 75, 4096  # one CLIP window; wider than any SD text encoder
EMBEDDINGS_DIR = "embeddings"  # the folder beside a model's model.json
SHORT_HASH = 12  # hex digits of an embedding's SHA-256 in records (A1111's shorthash)


@dataclass(frozen=True)
class Embedding:
    """A loaded embedding: its trigger word, file and short hash."""

    trigger: str
    path: Path
    hash: str

    @classmethod
    def of(cls, trigger: str, path: str | Path) -> Embedding:
        return cls(trigger, Path(path), file_digest(path)[:SHORT_HASH])

    @property
    def label(self) -> str:
        """'TRIGGER:HASH', what images record."""
        return f"{self.trigger}:{self.hash}"


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`FILE` or `FILE:TOKEN` -> (file, token or None); a colon inside an existing path (or a
    Windows drive) stays part of it."""
    head, sep, token = spec.rpartition(":")
    if sep and head and token and not Path(spec).exists() and not any(c in token for c in "/\\"):
        return Path(head), token
    return Path(spec), None


def read_embedding(path: str | Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """An embedding file -> (trigger word, vectors (n, D) float32)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise UserError(
            f"{path}: pickle embeddings can run code when loaded and are refused; use the "
            ".safetensors version of the embedding"
        )
    state, _ = open_safetensors(path)
    keys = sorted(state)
    if {"clip_l", "clip_g"} <= set(keys):
        raise UserError(f"{path}: an SDXL embedding (clip_l / clip_g); SDXL is not supported")
    if len(keys) != 1:
        raise UserError(
            f"{path}: not a textual-inversion embedding (expected one tensor, e.g. "
            f"{A1111_KEYS[0]!r}; found {len(keys)}: {keys[:4]})"
        )
    key = keys[0]
    lazy = state[key]
    shape = lazy.shape
    if (
        len(shape) not in (1, 2)
        or not lazy.dtype.is_floating_point
        or not 0 < shape[-1] <= MAX_WIDTH
        or (len(shape) == 2 and not 0 < shape[0] <= MAX_VECTORS)
    ):
        raise UserError(
            f"{path}: {key!r} is {lazy.dtype} of shape {list(shape)}; an embedding is 1 to "
            f"{MAX_VECTORS} floating-point vectors"
        )
    vectors = lazy.load(torch.float32).reshape(-1, shape[-1])
    if not bool(torch.isfinite(vectors).all()):
        raise UserError(f"{path}: the embedding holds NaN or Inf")
    return token or (path.stem if key in A1111_KEYS else key), vectors


def embedding_files(folder: str | Path | None) -> list[Path]:
    """The embeddings in a folder (its *.safetensors, sorted); none when it does not exist."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(Path(folder).glob("*.safetensors"))


def embedding_specs(
    model: ModelFolder, specs: Sequence[str] = (), folder: str | Path | None = None
) -> list[tuple[Path, str | None]]:
    """(file, token or None) of every embedding `load_embeddings` adds, in order: the files in
    `folder` (default: the `embeddings/` folder beside the model, if any), then `specs`."""
    if folder is None and model.path is not None:
        folder = Path(model.path) / EMBEDDINGS_DIR
    elif folder is not None and not Path(folder).is_dir():
        raise UserError(f"embeddings folder not found: {folder}")
    files = [(f, None) for f in embedding_files(folder)] if folder is not None else []
    return files + [split_spec(s) for s in specs]


def add_embeddings(
    model: LoadedModel, files: Iterable[tuple[Path, str | None]], skip: bool = False
) -> list[Embedding]:
    """Add (file, token) embeddings to the model's text encoder; with `skip`, one that does not
    fit it is logged and left out (as A1111 skips an embeddings folder's SD 2 files on SD 1)."""
    out = []
    for path, token in files:
        try:
            if model.text_encoder is None:
                raise UserError("embeddings need a text model; this model has no text encoder")
            word, vectors = read_embedding(path, token)
            model.text_encoder.add_embedding(word, vectors, source=str(path))
        except UserError as e:
            if not skip:
                raise
            log.info("embedding %s skipped: %s", path, e)
            continue
        out.append(Embedding.of(word, path))
    return out


def load_embeddings(
    model: LoadedModel, specs: Sequence[str] = (), folder: str | Path | None = None
) -> list[str]:
    """Add embeddings to a loaded text model: every file in `folder` (default: the
    `embeddings/` folder beside the model, if any), then each `FILE[:TOKEN]` of `specs`.
    Returns the trigger words, in that order."""
    return [e.trigger for e in add_embeddings(model, embedding_specs(model, specs, folder))]


def embedding_records(
    model: ModelFolder, specs: Sequence[str] = (), folder: str | Path | None = None
) -> list[Embedding]:
    """The embeddings `load_embeddings` would add to `model`, read without loading the model
    (what `generate` records)."""
    return [
        Embedding.of(read_embedding(p, t)[0], p) for p, t in embedding_specs(model, specs, folder)
    ]


def used_embeddings(embeddings: Iterable[Embedding], *texts: str) -> list[str]:
    """The labels of the embeddings whose trigger word appears in `texts` (the prompts)."""
    text = "\n".join(texts)
    return [
        e.label
        for e in embeddings
        if re.search(rf"(?<!\w){re.escape(e.trigger)}(?!\w)", text, re.IGNORECASE)
    ]
