"""FSDP (`--fsdp`) and activation checkpointing (`--grad-checkpoint`) for the training loop.

`--fsdp` shards parameters, gradients and optimizer state across ranks with PyTorch's
`fully_shard` (FSDP2). Each block of the network (`blocks`) is one unit, gathered for its
forward and backward and freed after; the rest (embeddings, conv_in, conv_out) is the root's.
The EMA copy is sharded the same way, so its update is a local lerp of shards. With `--bf16`
the units compute in bfloat16 and reduce gradients in float32 (`MixedPrecisionPolicy`).
Checkpoints are torch.distributed.checkpoint folders, one file per rank, which load back on any
world size, with or without FSDP (`load_sharded`); the model folder beside them always holds
the whole EMA weights in one safetensors file.

`--grad-checkpoint` recomputes each block's activations in the backward pass instead of keeping
them (PyTorch's composable `checkpoint`, which leaves parameter names as they are).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

SHARDED_MARK = ".metadata"  # the file torch.distributed.checkpoint writes last


def blocks(model: nn.Module) -> list[nn.Module]:
    """The network's repeated blocks, the modules its forward calls one by one: the outermost
    items of its ModuleLists that have a forward of their own (a U-Net's resnets, attention
    blocks, down- and upsamplers; not the levels that only group them, which are looked into)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(module, nn.ModuleList) and type(child).forward is not nn.Module.forward:
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def checkpoint_blocks(model: nn.Module) -> None:
    """--grad-checkpoint: each block's activations recomputed during backward."""
    from torch.distributed._composable import checkpoint

    for block in blocks(model):
        checkpoint(block)


def shard(model: nn.Module, bf16: bool) -> None:
    """fully_shard each block, then the rest of the model (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if bf16 else {}
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint folder is a torch.distributed.checkpoint one (--fsdp wrote it)."""
    return (path / SHARDED_MARK).is_file()


def _options(full: bool = False) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def save_sharded(path: Path, modules: dict[str, nn.Module], optimizers: dict) -> None:
    """Every rank writes its shards of `modules` and `optimizers` ({name: (optimizer, the
    module it steps)}) into the folder `path` (a collective)."""
    state = {name: get_model_state_dict(m, options=_options()) for name, m in modules.items()}
    for name, (opt, module) in optimizers.items():
        state[name] = get_optimizer_state_dict(module, opt, options=_options())
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: Path, modules: dict[str, nn.Module], optimizers: dict) -> None:
    """Read a `save_sharded` folder into `modules` and `optimizers`, sharded or not, on any
    world size (each rank reads the parts its own shards need)."""
    state = {name: get_model_state_dict(m, options=_options()) for name, m in modules.items()}
    for name, (opt, module) in optimizers.items():
        state[name] = get_optimizer_state_dict(module, opt, options=_options())
    with warnings.catch_warnings():  # one process: DCP says it assumes so
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    for name, m in modules.items():
        set_model_state_dict(m, state[name], options=_options())
    for name, (opt, module) in optimizers.items():
        set_optimizer_state_dict(module, opt, state[name], options=_options())


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU (a collective when `module` is sharded; every rank gets
    it under torch 2.13's cpu_offload only on rank 0)."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=_options(full=True))


def check_sharded(path: Path, modules: dict[str, nn.Module], optimizers: dict) -> None:
    """A CheckpointError unless the folder's index (torch.distributed.checkpoint metadata)
    lists every tensor of `modules` with its shape, before anything is loaded."""
    from ..io.checkpoint import CheckpointError

    if not is_sharded(path):
        raise CheckpointError(f"{SHARDED_MARK} is missing (a sharded checkpoint cut short)")
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # a torn or foreign index: any error means the checkpoint is unusable
        raise CheckpointError(f"{SHARDED_MARK} unreadable ({type(e).__name__})") from None
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            meta = saved.get(f"{name}.{key}")
            if meta is None or tuple(getattr(meta, "size", ())) != tuple(value.shape):
                raise CheckpointError(f"{name}.{key}: missing or of another shape")
    if optimizers and not any(k.startswith(f"{next(iter(optimizers))}.state") for k in saved):
        raise CheckpointError("no optimizer state")
