"""The models a server may use, by name: `--model DIR` and the folders inside `--models-dir`.

Names only, never paths: a name is one folder name inside the models directory, checked before
any file is touched, and the folder it resolves to (symlinks followed) must still lie inside
that directory. Each model is loaded once (safetensors only, via `load_diffusion_model`) and
shared by the workers; at most `max_loaded` stay in memory (least recently used goes first).

A folder whose model.json does not load is listed as broken with the reason (logged once per
version of the file) and refused by name; it never stops the server or affects other models.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import UserError
from ..io.checkpoint import MODEL_JSON
from ..io.model_folder import (
    LoadedModel,
    ModelFolder,
    default_model_dir,
    load_diffusion_model,
    model_dir,
)

log = logging.getLogger("latentforge.server")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


class BadModelName(UserError):
    """Not a plain folder name, or a folder outside the models directory (HTTP 400)."""


class ModelNotFound(UserError):
    """No such model (HTTP 404)."""


class BrokenModel(UserError):
    """A model folder whose model.json does not load (HTTP 422 naming the model field)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"model {name!r} does not load: {reason}")
        self.reason = reason


class ModelStore:
    def __init__(
        self,
        model: str | Path | None = None,
        models_dir: str | Path | None = None,
        max_loaded: int = 2,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
    ):
        self.device, self.dtype = device, dtype
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise UserError(f"models directory not found: {models_dir}")
        self.single: tuple[str, Path] | None = None
        if model is not None or self.models_dir is None:
            folder = model_dir(model).resolve() if model is not None else default_model_dir()
            if model is not None:
                _check_diffusion_folder(folder)
            self.single = (folder.name if model is not None else "default", folder)
        # Serving the embedded model also serves the embedded upscaler (for /v1/upscale) and
        # the embedded few-step model, "fast".
        self.embedded: dict[str, Path] = {}
        if model is None and self.models_dir is None:
            from ..pipelines.superres import UPSCALER, default_upscaler_dir

            upscaler = default_upscaler_dir()
            if (upscaler / MODEL_JSON).is_file():
                self.embedded[UPSCALER] = upscaler
            if (model_dir("fast") / MODEL_JSON).is_file():
                self.embedded["fast"] = model_dir("fast")
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._views: dict[Path, tuple[float, ModelFolder | str]] = {}  # a str: why it is broken
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # ----- names -------------------------------------------------------------------------------
    def entries(self) -> list[tuple[str, ModelFolder | str]]:
        """Every model folder by name, with its view or, for one that does not load, why."""
        folders = {self.single[0]: self.single[1]} if self.single else {}
        folders.update((name, p) for name, p in self.embedded.items() if name not in folders)
        if self.models_dir is not None:
            for p in sorted(self.models_dir.iterdir()):
                if p.name not in folders and _NAME.fullmatch(p.name) and self._inside(p):
                    folders[p.name] = p
        out = []
        for name, folder in folders.items():
            if (folder / MODEL_JSON).is_file():
                try:
                    out.append((name, self._view(folder)))
                except BrokenModel as e:
                    out.append((name, e.reason))
                except ModelNotFound:  # removed since the check above
                    pass
        return out

    def names(self) -> list[str]:
        """The names of the models that load (the broken ones are left out)."""
        return [name for name, view in self.entries() if not isinstance(view, str)]

    @property
    def default_name(self) -> str:
        if self.single is not None:
            return self.single[0]
        names = self.names()
        if "default" in names:
            return "default"
        if not names:
            raise ModelNotFound(f"no models in {self.models_dir}")
        return names[0]

    def resolve(self, name: str | None) -> tuple[str, Path]:
        """A model name (None: the default) -> (name, folder); BadModelName / ModelNotFound."""
        name = self.default_name if name is None else name
        if self.single is not None and name == self.single[0]:
            folder = self.single[1]
        elif name in self.embedded:
            folder = self.embedded[name]
        else:
            if not _NAME.fullmatch(name) or ".." in name:
                raise BadModelName(f"invalid model name {name!r}: use a name from /v1/models")
            if self.models_dir is None:
                raise ModelNotFound(f"unknown model {name!r}; choose one of {self.names()}")
            folder = self.models_dir / name
            if folder.exists() and not self._inside(folder):
                raise BadModelName(f"model {name!r} points outside the models directory")
        if not (folder / MODEL_JSON).is_file():
            raise ModelNotFound(f"unknown model {name!r}; choose one of {self.names()}")
        return name, folder

    def _inside(self, path: Path) -> bool:
        root = self.models_dir
        return root is not None and path.resolve().is_relative_to(root)

    # ----- views (model.json only: cheap, used to validate requests) ---------------------------
    def _view(self, folder: Path) -> ModelFolder:
        """The folder's validated model.json, re-read when the file changes; BrokenModel with
        the reason for a folder that is not a readable diffusion model (logged once)."""
        try:
            mtime = (folder / MODEL_JSON).stat().st_mtime
        except OSError:
            raise ModelNotFound(f"model {folder.name!r} has no readable model.json") from None
        cached = self._views.get(folder)
        if cached is None or cached[0] != mtime:
            try:
                view: ModelFolder | str = ModelFolder.read(folder)
            except Exception as e:  # whatever the file holds, this folder alone is affected
                # the reason without the server's paths: the folder as its model name
                reason = str(e) if isinstance(e, UserError) else f"unreadable ({type(e).__name__})"
                view = reason.replace(str(folder), folder.name)
                log.warning("model folder %s does not load: %s", folder, view)
            cached = self._views[folder] = (mtime, view)
        if isinstance(cached[1], str):
            raise BrokenModel(folder.name, cached[1])
        return cached[1]

    def view(self, name: str | None) -> tuple[str, ModelFolder]:
        """(name, the weights-free view of its folder): shapes, classes, sampling defaults."""
        name, folder = self.resolve(name)
        return name, self._view(folder)

    # ----- loaded models -----------------------------------------------------------------------
    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def get(self, name: str) -> LoadedModel:
        """The loaded model (loading it once, even when several workers ask at the same time)."""
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            with self._lock:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    return self._loaded[name]
            _, folder = self.resolve(name)
            model = load_diffusion_model(folder, device=self.device, dtype=self.dtype)
            with self._lock:
                self._loaded[name] = model
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            return model


def _check_diffusion_folder(folder: Path) -> None:
    ModelFolder.read(folder)  # UserError naming the problem
