"""Model folders and training checkpoints: safetensors + JSON, written atomically, never pickle.

Every writer here writes a temp file beside its target, fsyncs it, renames it into place and
fsyncs the folder (POSIX), so a reader sees the old file or the new one, also after a power cut.
Files get 0666 and folders 0777 less the umask (0644 / 0755 under the usual 022). A failed
write (disk full, read-only folder) removes its temp file and raises `WriteError`, one line
naming the path and the cause; `remove_stale_temps` clears what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
# what an interrupted write leaves: our temp files (mkstemp: ".NAME." + 8 characters) and
# safetensors' own (".tmp" + 6), and replace_dir_atomic's ".NAME.old" folders
_TEMP_FILE = re.compile(r"\..+\.(json|safetensors)\.[A-Za-z0-9_]{8}|\.tmp[A-Za-z0-9]{6}")
_OLD_DIR = re.compile(r"\.(?P<name>.+)\.old")
STEP_DIR = re.compile(r"step-(\d+)")  # a training checkpoint folder, written as .tmp-step-N
# files at least this large have their digest cached (hashing 3.4 GB of SD U-Net takes ~7 s;
# a tiny model's file hashes faster than the cache is read)
DIGEST_CACHE_MIN_BYTES = 64 << 20


class WriteError(UserError):
    """A file or folder could not be written (disk full, read-only, permissions): one line
    naming the path and the cause."""


def write_error(path: str | Path, e: BaseException) -> WriteError:
    """`WriteError` for an OSError (or safetensors' I/O error) while writing `path`."""
    if isinstance(e, OSError) and e.strerror:
        cause = e.strerror
    else:  # safetensors: "Error while serializing: I/O error: ... (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        cause = os.strerror(int(code.group(1))) if code else str(e)
    return WriteError(f"cannot write {path}: {cause[:1].lower()}{cause[1:]}")


def current_umask() -> int:
    """The process's umask; read from /proc where there is one, since setting it to read it
    back (the portable way) would let another thread create files meanwhile with umask 0."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def fsync_dir(folder: str | Path) -> None:
    """Make the renames in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a folder; the data itself is synced
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_write(path: Path, sync_dir: bool) -> Iterator[Path]:
    """A temp path beside `path` to write; then its mode, fsync, rename, fsync of the folder.
    On failure the temp file is removed and a `WriteError` names `path`."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp (and safetensors) make 0600 files
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        if sync_dir:
            fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: dict, *, sync_dir: bool = True) -> None:
    """Write JSON via a temp file in the same folder + rename: readers never see half a file.
    `sync_dir=False` leaves the folder's fsync to the caller (one for a folder of files)."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    with _atomic_write(path, sync_dir) as tmp:
        tmp.write_text(text)


def save_tensors_atomic(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict | None = None,
    *,
    sync_dir: bool = True,
) -> None:
    """Write a safetensors file as `write_json_atomic` writes JSON."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic_write(path, sync_dir) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


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
    except ValueError as e:  # json's own limits, e.g. an integer of more than 4300 digits
        raise UserError(f"{path}: invalid JSON ({str(e).split(':')[0]})") from None


def check_state(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str
) -> None:
    """UserError listing every key missing from `state`, unexpected in it or of another shape
    than in `own` (a module's state_dict); nothing is loaded."""
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


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with every mismatch listed in one clear error."""
    check_state(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


def replace_dir_atomic(tmp_dir: Path, final: Path) -> None:
    """Move a fully written folder into place (the old one, if any, is removed after): the
    folder gets 0777 less the umask (mkdtemp makes 0700) and is fsync'd, then renamed, then
    its parent fsync'd. A failure puts the old folder back and raises `WriteError`; removing
    `tmp_dir` is the caller's."""
    old = None
    try:
        os.chmod(tmp_dir, 0o777 & ~current_umask())
        fsync_dir(tmp_dir)  # the entries of the files written in it
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        try:
            os.replace(tmp_dir, final)
        except OSError:
            if old is not None:
                os.replace(old, final)
                old = None
            raise
        fsync_dir(final.parent)
    except OSError as e:
        raise write_error(final, e) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: str | Path, temp_dirs: str | None = None) -> list[str]:
    """Clear what writers killed midway left in `folder`: temp files of the atomic writers,
    folders whose name matches the glob `temp_dirs` (a caller's work folders), and
    `.NAME.old` folders of `replace_dir_atomic` (moved back to NAME when NAME is missing: the
    kill came between its two renames). Returns the names removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for p in sorted(folder.iterdir()):
        old = _OLD_DIR.fullmatch(p.name)
        if p.is_file() and _TEMP_FILE.fullmatch(p.name):
            p.unlink(missing_ok=True)
        elif p.is_dir() and temp_dirs and p.match(temp_dirs):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir() and old:
            if (folder / old["name"]).exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, folder / old["name"])
        else:
            continue
        done.append(p.name)
    return done


# ----- training checkpoint folders: step-N/{NAME.safetensors, state.json} ---------------------
class CheckpointError(Exception):
    """A checkpoint folder that cannot be resumed from (partial, corrupt); the message says
    why."""


def checkpoint_dirs(ckdir: Path) -> list[Path]:
    """The step-N entries of a checkpoints folder, oldest first."""
    if not ckdir.is_dir():
        return []
    return sorted((p for p in ckdir.iterdir() if STEP_DIR.fullmatch(p.name)), key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """N of a step-N folder."""
    return int(STEP_DIR.fullmatch(path.name)[1])


def read_checkpoint_state(path: Path) -> dict:
    """A checkpoint's state.json, checked for the keys resume reads."""
    if not path.is_dir():
        raise CheckpointError("not a folder")
    file = path / "state.json"
    if not file.is_file():
        raise CheckpointError("no state.json" + ("" if any(path.iterdir()) else " (empty folder)"))
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"state.json unreadable ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"state.json is not valid JSON ({e.msg} at line {e.lineno})"
        ) from None
    if not (
        isinstance(state, dict)
        and type(state.get("step")) is int
        and isinstance(state.get("config"), dict)
        and isinstance(state.get("optimizers", state.get("optimizer")), dict)
    ):
        raise CheckpointError("state.json lacks step, config or optimizer state")
    if state["step"] != checkpoint_step(path):
        raise CheckpointError(f"state.json is for step {state['step']}")
    return state


def checked_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: object, name: str
) -> dict:
    """The optimizer state dict stored as `tensors` + `meta`, checked to fit `opt` (parameter
    groups and sizes, tensor shapes) before anything is loaded."""
    try:
        sd = unflatten_optimizer(tensors, meta)
        own = opt.state_dict()["param_groups"]
        if [len(g["params"]) for g in sd["param_groups"]] != [len(g["params"]) for g in own]:
            raise CheckpointError(f"{name}: other parameter groups than this model's")
        shapes = {}
        for ids, group in zip(
            [g["params"] for g in sd["param_groups"]], opt.param_groups, strict=True
        ):
            shapes.update({i: p.shape for i, p in zip(ids, group["params"], strict=True)})
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() and v.shape != shapes[pid]:
                    raise CheckpointError(
                        f"{name}: {pid}.{k} has shape {tuple(v.shape)}, its parameter "
                        f"{tuple(shapes[pid])}"
                    )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{name}: malformed optimizer state") from None
    return sd


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors for safetensors, JSON for the rest)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """`flatten_optimizer`'s inverse: an optimizer state dict."""
    state: dict[int, dict] = {}
    for flat, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = flat.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def default_cache_dir() -> Path:
    """$LATENTFORGE_CACHE, else ~/.cache/latentforge: feature statistics, weight digests."""
    return Path(os.environ.get("LATENTFORGE_CACHE", Path.home() / ".cache" / "latentforge"))


def _sha256_prefix(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (model identity in PNGs and provenance).

    Large files' digests are kept in the cache folder's `digests.json`, keyed by the resolved
    path and valid while the file's size and modification time are unchanged (A1111 keeps its
    model hashes the same way); a cache that cannot be read or written is ignored."""
    path = Path(path).resolve()
    st = path.stat()
    if st.st_size < DIGEST_CACHE_MIN_BYTES:
        return _sha256_prefix(path)
    cache_file = default_cache_dir() / "digests.json"
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        cache = json.loads(cache_file.read_text())
        hit = cache.get(str(path)) if isinstance(cache, dict) else None
    except (OSError, ValueError):
        cache, hit = {}, None
    if isinstance(hit, list) and hit[:2] == stamp and isinstance(hit[-1], str):
        return hit[-1]
    digest = _sha256_prefix(path)
    cache = cache if isinstance(cache, dict) else {}
    cache[str(path)] = [*stamp, digest]
    with contextlib.suppress(UserError, OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache, sync_dir=False)
    return digest
