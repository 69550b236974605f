"""The models a server may use, by name: `--model DIR` and the folders inside `--models-dir`.

Names only, never paths: a name is one folder name inside the models directory, checked before
any file is touched, and the folder it resolves to (symlinks followed) must still lie inside
that directory. Each model is loaded once (safetensors only, via `load_diffusion_model`) and
shared by the workers; at most `max_loaded` stay in memory (least recently used goes first).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import UserError
from ..io.checkpoint import MODEL_JSON
from ..io.model_folder import LoadedModel, ModelFolder, default_model_dir, load_diffusion_model

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


class BadModelName(UserError):
    """Not a plain folder name, or a folder outside the models directory (HTTP 400)."""


class ModelNotFound(UserError):
    """No such model (HTTP 404)."""


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
            folder = Path(model).resolve() if model is not None else default_model_dir()
            if model is not None:
                _check_diffusion_folder(folder)
            self.single = (folder.name if model is not None else "default", folder)
        # Serving the embedded model also serves the embedded upscaler (for /v1/upscale).
        self.embedded: dict[str, Path] = {}
        if model is None and self.models_dir is None:
            from ..pipelines.superres import UPSCALER, default_upscaler_dir

            upscaler = default_upscaler_dir()
            if (upscaler / MODEL_JSON).is_file():
                self.embedded[UPSCALER] = upscaler
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._views: dict[Path, tuple[float, ModelFolder]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # ----- names -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        out = [self.single[0]] if self.single and (self.single[1] / MODEL_JSON).is_file() else []
        out += [name for name in self.embedded if name not in out]
        if self.models_dir is not None:
            for p in sorted(self.models_dir.iterdir()):
                if p.name in out or not _NAME.fullmatch(p.name) or not self._inside(p):
                    continue
                if (p / MODEL_JSON).is_file() and self._readable(p):
                    out.append(p.name)
        return out

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
        """The folder's validated model.json, re-read when the file changes; UserError for a
        folder that is not a readable diffusion model."""
        try:
            mtime = (folder / MODEL_JSON).stat().st_mtime
        except OSError:
            raise ModelNotFound(f"model {folder.name!r} has no readable model.json") from None
        cached = self._views.get(folder)
        if cached is None or cached[0] != mtime:
            cached = self._views[folder] = (mtime, ModelFolder.read(folder))
        return cached[1]

    def view(self, name: str | None) -> tuple[str, ModelFolder]:
        """(name, the weights-free view of its folder): shapes, classes, sampling defaults."""
        name, folder = self.resolve(name)
        return name, self._view(folder)

    def _readable(self, folder: Path) -> bool:
        """Whether the folder is a valid diffusion model (a broken one is left out of the list,
        not a reason to fail the whole listing)."""
        try:
            self._view(folder)
        except (UserError, OSError):
            return False
        return True

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
