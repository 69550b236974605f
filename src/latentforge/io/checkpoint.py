"""Model folders and training checkpoints: safetensors + JSON, written atomically, never pickle."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files; give the final file the usual permissions (umask applies)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON via a temp file in the same folder + rename: readers never see half a file."""
    path = Path(path)
    tmp = _atomic_target(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_tensors_atomic(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    path = Path(path)
    tmp = _atomic_target(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise UserError(
            f"{path}: pickle checkpoints are refused (they can run code); "
            "convert it with `latentforge import --allow-pickle`"
        )
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def read_json_file(folder: str | Path) -> Any:
    """A model folder's model.json, parsed (not validated: `model_folder.read_model_meta` does
    that); UserError for a missing folder or file, a pickle in its place, or bad JSON."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"model folder not found: {folder}")
    if folder.is_file():
        raise UserError(f"{folder} is a file; --model expects a model folder")
    path = folder / MODEL_JSON
    if not path.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickle file {pickles[0]}: refused)" if pickles else ""
        raise UserError(f"{folder} is not a latentforge model folder: no {MODEL_JSON}{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__})") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with every mismatch listed in one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shape:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", bad_shape),
        ):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise UserError(f"{what}: weights do not match the config; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def replace_dir_atomic(tmp_dir: Path, final: Path) -> None:
    """Move a fully written folder into place (the old one, if any, is removed after)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp_dir, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
