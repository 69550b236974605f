"""Lazy weights: read a checkpoint tensor by tensor, never holding a second full copy in RAM.

A lazy state is a plain `dict[str, LazyTensor]`: names and shapes come from the file header, the
bytes are read only when a tensor is loaded. Renaming keys (diffusers / LDM -> native) is a dict
comprehension; reshaping or slicing (1x1 conv <-> linear, OpenCLIP's fused q/k/v) composes lazily.

`build_module` makes a module on the meta device (no memory, no random init), checks every name
and shape strictly, then reads each tensor once and assigns it (`load_state_dict(assign=True)`):
peak memory is the model itself plus one tensor. Safetensors are read with plain `readinto`
(not mmap) so the file's pages are not counted in the process's memory twice.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .checkpoint import PICKLE_SUFFIXES, load_state_strict

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}  # fmt: skip
_MAX_HEADER = 100 * 2**20
# integer tensors that belong in a checkpoint: index buffers (CLIP's position_ids, BatchNorm's
# counter); any other integer or boolean tensor sits where a floating weight is expected
INDEX_BUFFERS = re.compile(r"(position_ids|token_type_ids|num_batches_tracked)$")


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype; `load()` reads it (and only then)."""

    read: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.read()
        if tuple(t.shape) != self.shape:
            t = t.reshape(self.shape)
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    def numel(self) -> int:
        return math.prod(self.shape)

    def reshape(self, shape: tuple[int, ...]) -> LazyTensor:
        shape = tuple(shape)
        if math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return LazyTensor(self.read, shape, self.dtype)

    def slice0(self, start: int, stop: int) -> LazyTensor:
        """Rows start:stop of the first dimension (a fused q/k/v projection split in three)."""
        read = self.read
        shape = (stop - start, *self.shape[1:])
        return LazyTensor(lambda: read()[start:stop].clone(), shape, self.dtype)


LazyState = dict[str, LazyTensor]


def lazy(t: torch.Tensor) -> LazyTensor:
    """Wrap a tensor already in memory."""
    return LazyTensor(lambda: t, tuple(t.shape), t.dtype)


def as_lazy(state: Mapping[str, torch.Tensor | LazyTensor]) -> LazyState:
    return {k: v if isinstance(v, LazyTensor) else lazy(v) for k, v in state.items()}


# --------------------------------------------------------------------------- readers


def _read_into(path: Path, start: int, end: int, shape: tuple[int, ...], dtype: torch.dtype):
    t = torch.empty(shape, dtype=dtype)
    if not t.numel():
        return t
    buf = memoryview(t.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        done = 0
        while done < end - start:  # one read() returns at most ~2 GiB on Linux
            n = f.readinto(buf[done:])
            if not n:
                raise UserError(f"{path}: file ends inside a tensor (truncated download?)")
            done += n
    return t


def open_safetensors(path: str | Path) -> tuple[LazyState, dict[str, str]]:
    """Header of a .safetensors file -> (lazy state, metadata); nothing else is read yet."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    size = path.stat().st_size

    def corrupt(why: str) -> UserError:
        return UserError(f"{path}: not a readable safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("too short")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise corrupt(f"header length {n} out of range for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # also bad UTF-8 and json's own limits
            raise corrupt("header is not JSON, or nested too deeply") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupt("__metadata__ is not a map of strings")
    state: LazyState = {}
    for name, info in header.items():
        dtype, shape, start, end = _entry(name, info, 8 + n, size, corrupt)
        state[name] = LazyTensor(
            lambda s=start, e=end, sh=shape, dt=dtype: _read_into(path, s, e, sh, dt), shape, dtype
        )
    return state, meta


def _entry(name: str, info, base: int, size: int, corrupt) -> tuple:
    """One header entry -> (dtype, shape, start, end), every number checked against the file."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise corrupt(f"bad entry for {name!r}")
    if info["dtype"] not in _DTYPES:
        raise corrupt(f"{name}: unknown dtype {info['dtype']!r}")
    dtype = _DTYPES[info["dtype"]]
    if dtype is None:
        raise corrupt(f"{name}: dtype {info['dtype']} is not supported by this torch")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise corrupt(f"{name}: shape {str(shape)[:40]} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise corrupt(f"{name}: data_offsets {offsets!r} are not two integers")
    start, end = base + offsets[0], base + offsets[1]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > size:  # a product past the file (also any overflow of int64 sizes)
        raise corrupt(f"{name}: its shape needs more bytes than the {size}-byte file holds")
    if end - start != nbytes or start < base or end > size:
        raise corrupt(f"{name}: data offsets do not match its shape or the file size")
    return dtype, tuple(shape), start, end


def open_pickle(path: str | Path) -> LazyState:
    """A torch pickle (.ckpt/.bin) through `torch.load(weights_only=True)`: tensors only, no code.

    Lightning checkpoints keep the weights under "state_dict"; that level is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: cannot load with torch.load(weights_only=True) ({first[:200]})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    return {k: lazy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def open_weights(path: str | Path, *, allow_pickle: bool = False) -> LazyState:
    """Any single weights file: safetensors always; pickles only with allow_pickle."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{path}: pickle checkpoints can run code when loaded and are refused; "
                "use a .safetensors file, or pass --allow-pickle (loads tensors only)"
            )
        return open_pickle(path)
    return open_safetensors(path)[0]


def open_sharded(index: str | Path) -> LazyState:
    """A sharded safetensors set from its `*.safetensors.index.json` (weight_map)."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        raise UserError(f"{index}: not a readable safetensors index") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and Path(v).name == v and v not in ("", ".", "..")
        for v in weight_map.values()
    ):
        raise UserError(f"{index}: weight_map must map tensor names to files beside the index")
    state: LazyState = {}
    for shard in sorted(set(weight_map.values())):
        state.update(open_safetensors(index.parent / shard)[0])
    return state


# --------------------------------------------------------------------------- building modules


def meta_tensors(state: Mapping[str, LazyTensor]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (meta device): enough for a strict name/shape check."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


def meta_module(factory: Callable[[], nn.Module], what: str) -> nn.Module:
    """factory() on the meta device; a config the network rejects is a one-line UserError."""
    try:
        with torch.device("meta"):
            return factory()
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def check_strict(module: nn.Module, state: Mapping[str, LazyTensor], what: str) -> None:
    """Every key used, every parameter filled, shapes equal: one error listing all mismatches.

    `module` must live on the meta device (build it under `torch.device("meta")`); no tensor
    data is read.
    """
    load_state_strict(module, meta_tensors(state), what)
    own = module.state_dict()
    check_float_weights(state, what, [k for k, v in own.items() if not v.is_floating_point()])


def check_float_weights(
    state: Mapping[str, LazyTensor], what: str, integer: list[str] | None = None
) -> None:
    """Every tensor floating point except `integer` names (default: `INDEX_BUFFERS`): an
    int32 weight would load and then break the first matmul. No tensor data is read."""
    bad = [
        f"{k} ({str(v.dtype).removeprefix('torch.')})"
        for k, v in state.items()
        if not v.dtype.is_floating_point
        and (k not in integer if integer is not None else not INDEX_BUFFERS.search(k))
    ]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UserError(
            f"{what}: integer or boolean tensors where floating-point weights belong: "
            f"{', '.join(bad[:3])}{more}"
        )


def build_module(
    factory: Callable[[], nn.Module],
    state: Mapping[str, LazyTensor | torch.Tensor],
    what: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """factory() on the meta device, strict check, then tensor-by-tensor assignment.

    dtype None keeps each parameter's own dtype (float32 as built); torch.bfloat16 gives bf16
    weights without ever holding an fp32 copy of the model.
    """
    state = as_lazy(state)
    module = meta_module(factory, what)
    check_strict(module, state, what)
    own = module.state_dict()
    tensors = {}
    for name, p in own.items():
        want = p.dtype if dtype is None or not p.is_floating_point() else dtype
        tensors[name] = state[name].load(want).to(device)
    module.load_state_dict(tensors, strict=True, assign=True)
    leftover = [n for n, b in module.named_buffers() if b.is_meta]
    if leftover:  # non-persistent buffers are not in any checkpoint
        raise UserError(f"{what}: buffers {leftover[:3]} cannot be built lazily")
    return module


def load_all(state: Mapping[str, LazyTensor], dtype: torch.dtype | None = None) -> dict:
    """Read every tensor (for writing a converted file); floating tensors cast to dtype."""
    return {k: v.load(dtype) for k, v in state.items()}
