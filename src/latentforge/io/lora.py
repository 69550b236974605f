"""LoRA files in and out: kohya / A1111 and diffusers / PEFT keys <-> our modules' names.

Read: `.safetensors` only (kohya's `.pt` pickles are refused like every pickle). Formats by key:

* kohya / A1111: `lora_unet_<module, '.' -> '_'>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, `lora_te_...` for the text encoder. U-Net modules in diffusers names (= ours) or in
  the original LDM names (`lora_unet_input_blocks_1_1_...`, through `ldm.unet_key_to_ldm`);
  linear and conv layers (LoCon).
* diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.` for the
  text encoder; no prefix or `base_model.model.`: the U-Net), `.weight` optional; alpha from
  diffusers' `lora_adapter_metadata` (`unet.lora_alpha`), else alpha = rank.
* LyCORIS LoHa / LoKr, DoRA, Tucker-core LoCon: recognised by their keys, refused by name.

Apply (`apply_loras`): the deltas of every file, each times its scale, summed per layer and fused
into the loaded model's weights (`models/lora.py`); `remove_loras` puts the weights back exactly.
Keys that match no layer are an error listing them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..models.conditioned import ConcatUNet
from ..models.lora import LoraFactors, fuse, restore
from ..models.presets import UNetConfig
from ..models.unet import UNet
from . import ldm
from .checkpoint import MODEL_WEIGHTS, replace_dir_atomic, save_tensors_atomic
from .diffusers_format import _fresh_work_dir
from .lazy import open_safetensors
from .model_folder import (
    LoadedModel,
    file_digest,
    load_diffusion_model,
    save_model_folder,
)

UNET, TEXT = "unet", "text_encoder"  # the parts a LoRA can touch
_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_A": "down", ".lora_B": "up",
}  # fmt: skip
_UNSUPPORTED = {  # a key part -> the format it belongs to
    "hada_w1_a": "LoHa (LyCORIS)", "hada_w1_b": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)",
    "lokr_w1_a": "LoKr (LyCORIS)", "lokr_w2": "LoKr (LyCORIS)", "lora_mid": "LoCon with a "
    "Tucker core (lora_mid)", "dora_scale": "DoRA", "on_input": "(IA)^3",
}  # fmt: skip
_PEFT_PREFIX = "base_model.model."
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per part, JSON
_SPEC = re.compile(r"(?P<path>.+?)(?::(?P<scale>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?))?")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and its scale, written FILE[:SCALE] (`--lora`, `loras=[...]`)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str | Path | LoraSpec) -> LoraSpec:
        if isinstance(text, LoraSpec):
            return text
        m = _SPEC.fullmatch(str(text))
        if m is None:
            raise UserError(f"expected FILE[:SCALE] for a LoRA, got {str(text)!r}")
        scale = float(m["scale"]) if m["scale"] is not None else 1.0
        if not math.isfinite(scale):
            raise UserError(f"LoRA scale must be a finite number, got {m['scale']}")
        return cls(Path(m["path"]), scale)

    @property
    def label(self) -> str:
        """'NAME:SCALE' as `SampleSettings.loras` records it (NAME: the file name without
        .safetensors, as A1111's `<lora:NAME:SCALE>`)."""
        short = f"{self.scale:g}"  # "0.8", "1"; the exact value where that rounds it
        scale = short if float(short) == self.scale else repr(self.scale)
        return f"{self.path.name.removesuffix('.safetensors')}:{scale}"

    @property
    def text(self) -> str:
        """'PATH:SCALE', what `parse` reads back to this spec."""
        return f"{self.path}:{self.scale!r}"


def find_lora_files(
    labels: Iterable[str], near: str | Path, given: Iterable[str | Path | LoraSpec] = ()
) -> list[LoraSpec]:
    """Recorded 'NAME:SCALE' labels (a PNG's) -> files at the recorded scales: a `given` file of
    that name (`--lora`), else NAME or NAME.safetensors in the folder `near`."""
    by_name = {}
    for g in map(LoraSpec.parse, given):
        by_name[g.path.name] = by_name[g.path.name.removesuffix(".safetensors")] = g.path
    out = []
    for label in labels:
        spec = LoraSpec.parse(label)
        name = spec.path.name
        candidates = [Path(near) / name, Path(near) / f"{name}.safetensors"]
        path = by_name.get(name) or next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise UserError(
                f"made with the LoRA {label!r}: put {name}.safetensors next to the image "
                "or pass --lora FILE"
            )
        out.append(LoraSpec(path, spec.scale))
    return out


@dataclass
class AppliedLoras:
    """What `apply_loras` changed: the labels applied and the original weights per part."""

    labels: list[str]
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


# ----- our modules and the names files give them -----------------------------------------------
def denoiser_network(model: LoadedModel) -> nn.Module:
    """The network the model's weights file holds: its U-Net, or the concat wrapper around it
    (whatever denoiser wrappers sit in front)."""
    return next(m for m in model.denoiser.modules() if isinstance(m, UNet | ConcatUNet))


def lora_roots(model: LoadedModel) -> dict[str, nn.Module]:
    """The networks a LoRA applies to: the U-Net (inside a concat wrapper too) and, where the
    model has one, the text encoder's transformer."""
    net = denoiser_network(model)
    roots = {UNET: getattr(net, "unet", net)}
    if model.text_encoder is not None:
        roots[TEXT] = model.text_encoder.model
    return roots


def _layers(root: nn.Module) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def key_names(roots: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Every name a file may give a layer -> (part, module name): kohya's (diffusers- and
    LDM-named U-Net), diffusers / PEFT's, for transformers 4 and 5 text-model names."""
    names: dict[str, tuple[str, str]] = {}
    if UNET in roots:
        unet = roots[UNET]
        config: UNetConfig | None = getattr(unet, "config", None)
        for n in _layers(unet):
            target = (UNET, n)
            names[f"lora_unet_{n.replace('.', '_')}"] = names[f"unet.{n}"] = names[n] = target
            try:
                old = ldm.unet_key_to_ldm(f"{n}.weight", config).removesuffix(".weight")
                names[f"lora_unet_{old.replace('.', '_')}"] = target
            except (ValueError, KeyError, AttributeError):  # no LDM name (our own extras)
                pass
    if TEXT in roots:
        for n in _layers(roots[TEXT]):
            target = (TEXT, n)
            for full in {n, n if n.startswith("text_model.") else f"text_model.{n}"}:
                names[f"lora_te_{full.replace('.', '_')}"] = names[f"text_encoder.{full}"] = target
    return names


# ----- reading files ---------------------------------------------------------------------------
def _split(key: str) -> tuple[str, str | None]:
    """'a.b.lora_down.weight' -> ('a.b', 'down'); an unknown suffix -> (key, None)."""
    for suffix, what in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], what
    return key, None


def _alphas(meta: Mapping[str, str], path: Path) -> dict[str, float]:
    """{part: lora_alpha} from diffusers' adapter metadata (absent: alpha = rank)."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise UserError(f"{path}: {METADATA_KEY} is not JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: {METADATA_KEY} is not a JSON object")
    out = {}
    for part in (UNET, TEXT):
        if config.get(f"{part}.alpha_pattern"):
            raise UserError(f"{path}: not supported: per-layer alphas ({part}.alpha_pattern)")
        alpha = config.get(f"{part}.lora_alpha")
        if alpha is not None:
            if not isinstance(alpha, int | float) or isinstance(alpha, bool):
                raise UserError(f"{path}: {part}.lora_alpha must be a number, got {alpha!r}")
            out[part] = float(alpha)
    return out


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata; a pickle or a non-LoRA format is an error before
    any tensor is read."""
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: LoRA files are read as .safetensors (pickles are refused)")
    state, meta = open_safetensors(path)
    for key in state:
        for part in key.split("."):
            if part in _UNSUPPORTED:
                raise UserError(f"{path}: not supported: {_UNSUPPORTED[part]} (key {key})")
    return {k: t.load() for k, t in state.items()}, meta


class LoraFileCache:
    """Read LoRA files kept by (path, size, mtime), so a repeat request reads nothing (the
    server's); at most `max_bytes` of tensors, the least recently used file dropped first.
    Thread-safe; a changed file is read again."""

    def __init__(self, max_bytes: int = 2**30):
        self.max_bytes = max_bytes
        self._files: OrderedDict[tuple, tuple[dict[str, torch.Tensor], dict[str, str], int]]
        self._files = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files read from disk (tests, benchmarks)

    def read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        try:
            st = path.stat()
        except OSError:
            raise UserError(f"LoRA file not found: {path}") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key][:2]
        state, meta = _read_file(path)
        size = sum(t.numel() * t.element_size() for t in state.values())
        with self._lock:
            self.reads += 1
            self._files[key] = (state, meta, size)
            while len(self._files) > 1 and sum(f[2] for f in self._files.values()) > self.max_bytes:
                self._files.popitem(last=False)
        return state, meta


def lora_files(folder: str | Path | None) -> dict[str, Path]:
    """{NAME: file} of the LoRAs in a folder (its *.safetensors, NAME the file name without
    .safetensors, as A1111's `<lora:NAME>`); none when there is no such folder."""
    if folder is None or not Path(folder).is_dir():
        return {}
    files = sorted(Path(folder).glob("*.safetensors"))
    return {p.name.removesuffix(".safetensors"): p for p in files if p.is_file()}


def read_lora(
    path: str | Path, names: Mapping[str, tuple[str, str]], cache: LoraFileCache | None = None
) -> dict[tuple[str, str], LoraFactors]:
    """A LoRA file -> {(part, module name): factors}, every key checked against `names`
    (`key_names`): keys matching no layer, a missing half or a non-LoRA format are one error.
    `cache`: read the file through it (unchanged files are not read again)."""
    path = Path(path)
    state, meta = _read_file(path) if cache is None else cache.read(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in state.items():
        base, what = _split(key.removeprefix(_PEFT_PREFIX))
        if what is None:
            unknown.append(key)
        else:
            groups.setdefault(base, {})[what] = t
    unmatched = unknown + sorted(b for b in groups if b not in names)
    if unmatched:
        more = f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        raise UserError(
            f"{path}: {len(unmatched)} key(s) match no layer of this model: "
            f"{', '.join(unmatched[:5])}{more}"
        )
    if not groups:
        raise UserError(f"{path}: no LoRA weights in this file")
    alphas = _alphas(meta, path)
    out: dict[tuple[str, str], LoraFactors] = {}
    for base, g in groups.items():
        if "down" not in g or "up" not in g:
            half = "up" if "down" in g else "down"
            raise UserError(f"{path}: {base} has no {half} weight")
        target = names[base]
        alpha = float(g["alpha"].item()) if "alpha" in g else alphas.get(target[0])
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise UserError(f"{path}: {base} has alpha {alpha}; it must be a positive number")
        if target in out:
            raise UserError(f"{path}: two entries for the layer {target[1]} ({base})")
        out[target] = LoraFactors(g["down"], g["up"], alpha)
    return out


# ----- applying ----------------------------------------------------------------------------------
def lora_layers(
    roots: Mapping[str, nn.Module], specs: Iterable[LoraSpec], cache: LoraFileCache | None = None
) -> dict[str, dict[str, list[tuple[LoraFactors, float]]]]:
    """{part: {module name: [(factors, scale), ...]}} of several LoRA files, every file read and
    every layer's factors checked against its weight before anything is changed."""
    names = key_names(roots)
    layers: dict[str, dict[str, list[tuple[LoraFactors, float]]]] = {}
    for spec in specs:
        for (part, name), factors in read_lora(spec.path, names, cache).items():
            try:
                factors.check(roots[part].get_submodule(name).weight.shape)
            except ValueError as e:
                raise UserError(f"{spec.path}: layer {name}: {e}") from None
            layers.setdefault(part, {}).setdefault(name, []).append((factors, spec.scale))
    return layers


def _clear_text_cache(model: LoadedModel) -> None:
    # the encoder memoises prompts, plain and weighted (models/text.py); its states change with
    # its weights
    if model.text_encoder is not None:
        model.text_encoder._cache.clear()
        model.text_encoder._prompt_cache.clear()


def apply_loras(
    model: LoadedModel,
    specs: Iterable[str | Path | LoraSpec],
    keep: bool = True,
    cache: LoraFileCache | None = None,
) -> AppliedLoras:
    """Fuse LoRAs (FILE[:SCALE] each) into `model` in place; undo with `remove_loras` (unless
    keep=False, which keeps no original weights: for a model loaded for one use). `cache`:
    read the files through it."""
    specs = [LoraSpec.parse(s) for s in specs]
    roots = lora_roots(model)
    layers = lora_layers(roots, specs, cache)
    applied = AppliedLoras([s.label for s in specs])
    for part, items in layers.items():
        applied.saved[part] = fuse(roots[part], items, keep)
    if TEXT in layers:
        _clear_text_cache(model)
    return applied


def remove_loras(model: LoadedModel, applied: AppliedLoras) -> None:
    """Put back the weights `apply_loras` changed, bit for bit."""
    roots = lora_roots(model)
    for part, saved in applied.saved.items():
        restore(roots[part], saved)
    if TEXT in applied.saved:
        _clear_text_cache(model)
    applied.saved.clear()


def load_model_with_loras(
    path: str | Path | None,
    loras: Iterable[str | Path | LoraSpec] = (),
    *,
    device: str | torch.device | None = "cpu",
    dtype: str = "fp32",
) -> tuple[LoadedModel, list[str]]:
    """`load_diffusion_model` with LoRAs (FILE[:SCALE] each) fused in: (model, their
    NAME:SCALE labels, what `SampleSettings.loras` records)."""
    model = load_diffusion_model(path, device=device, dtype=dtype)
    return model, apply_loras(model, loras, keep=False).labels if loras else []


# ----- writing -----------------------------------------------------------------------------------
def save_lora(
    path: str | Path,
    factors: Mapping[tuple[str, str], LoraFactors],
    fmt: str = "kohya",
    provenance: dict | None = None,
) -> None:
    """{(part, module name): factors} -> a `.safetensors` LoRA file: kohya's keys (`lora_unet_*`,
    `lora_te_*`, with `.alpha`; what A1111 and ComfyUI load) or diffusers' (`unet.*.lora_A`,
    alphas in `lora_adapter_metadata`; what `load_lora_weights` loads). `provenance` goes into
    the file's metadata as JSON (`latentforge.training`)."""
    if fmt not in ("kohya", "diffusers"):
        raise UserError(f"unknown LoRA format {fmt!r}; use 'kohya' or 'diffusers'")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}
    for (part, name), f in factors.items():
        alpha = float(f.rank if f.alpha is None else f.alpha)
        if fmt == "kohya":
            key = f"lora_{'unet' if part == UNET else 'te'}_{name.replace('.', '_')}"
            tensors |= {f"{key}.lora_down.weight": f.down, f"{key}.lora_up.weight": f.up,
                        f"{key}.alpha": torch.tensor(alpha)}  # fmt: skip
            continue
        tensors |= {f"{part}.{name}.lora_A.weight": f.down, f"{part}.{name}.lora_B.weight": f.up}
        if (
            meta.setdefault(f"{part}.lora_alpha", alpha) != alpha
            or meta.setdefault(f"{part}.r", f.rank) != f.rank
        ):
            raise UserError(f"diffusers LoRA files hold one rank and alpha per part ({part})")
        meta.setdefault(f"{part}.target_modules", []).append(name)
    extra = {METADATA_KEY: json.dumps(meta, sort_keys=True)} if meta else {"format": "pt"}
    if provenance is not None:
        extra["latentforge.training"] = json.dumps(provenance, sort_keys=True)
    save_tensors_atomic(path, tensors, extra)


# ----- merging into a new model folder -----------------------------------------------------------
def merge_loras(
    model_dir: str | Path, specs: Iterable[str | Path | LoraSpec], out: str | Path
) -> dict:
    """A copy of the model folder `model_dir` with the LoRAs fused into its U-Net (and CLIP text
    encoder) weights, at `out`; model.json records what was merged (`source.loras`)."""
    src, dst = Path(model_dir), Path(out)
    model = load_diffusion_model(src, device="cpu")
    applied = apply_loras(model, specs)
    text = model.meta.text_encoder or {}
    if TEXT in applied.saved and text.get("type") != "clip":
        raise UserError(
            f"{src}: its {text.get('type')} text encoder is not stored in the folder; "
            "merge only U-Net LoRAs into it"
        )
    work = _fresh_work_dir(dst)
    try:
        # the whole folder (VAE, text encoder, tokenizer), not a training run's leftovers
        skip = shutil.ignore_patterns("checkpoints", "samples")
        shutil.copytree(src, work, dirs_exist_ok=True, ignore=skip)
        source = {
            **(model.meta.source or {}),
            "merged_from": str(src.resolve()),
            "base_weights": file_digest(src / MODEL_WEIGHTS),
            "loras": applied.labels,
        }
        save_model_folder(
            work, model.meta.replace(source=source), denoiser_network(model).state_dict()
        )
        if TEXT in applied.saved:
            te_dir = work / text.get("path", "text_encoder")
            for old in te_dir.glob("*.safetensors*"):
                old.unlink()
            model.text_encoder.model.save_pretrained(te_dir, safe_serialization=True)
        replace_dir_atomic(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"dst": str(dst), "loras": applied.labels, "parts": sorted(applied.saved)}
