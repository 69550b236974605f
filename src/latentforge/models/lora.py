"""LoRA on any network's Linear and Conv2d layers (Hu et al. 2021, "LoRA"; LoCon for convolutions).

A LoRA replaces a layer's weight W by W + scale * (alpha / rank) * up @ down, with `down`
(rank, in[, kh, kw]) and `up` (out, rank[, 1, 1]). Two ways to apply it live here, over module
names only (file formats and name mapping are `io/lora.py`):

* `fuse` adds the deltas into the weights in place (one addmm per layer) and returns the
  touched layers' original weights, which `restore` copies back bit for bit: no copy of the
  model, no cost per step (what inference uses; docs/lora.md has the measurements).
* `LoraNetwork` holds trainable factors and adds `up(down(x))` through forward hooks, leaving
  the base weights frozen and untouched (what training uses).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# attention projections: our (= diffusers') U-Net's, CLIP's and BERT's (MiniLM) text encoders'
ATTENTION_PROJECTIONS = (
    "to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj",
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense",
)  # fmt: skip


@dataclass(frozen=True)
class LoraFactors:
    """One layer's LoRA: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]); alpha None = rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def check(self, shape: Iterable[int]) -> None:
        """A ValueError unless the factors fit a weight of `shape`: ranks agree, up is 1x1, and
        up @ down has the weight's numbers (a linear LoRA also fits a 1x1 conv, SD 1.x's
        proj_in / proj_out, and the reverse)."""
        shape = tuple(shape)
        if self.up.dim() > 2 and any(s != 1 for s in self.up.shape[2:]):
            raise ValueError(f"LoRA up kernel {tuple(self.up.shape[2:])} is not 1x1")
        out, r_up, r_down = self.up.shape[0], self.up[0].numel(), self.rank
        if r_up != r_down:
            raise ValueError(f"LoRA ranks differ: up {r_up}, down {r_down}")
        fan_in = self.down[0].numel()
        if out * fan_in != math.prod(shape) or out != shape[0]:
            want = "x".join(map(str, shape))
            raise ValueError(f"LoRA gives a {out}x{fan_in} delta for a {want} weight")

    def delta(self, shape: Iterable[int], scale: float = 1.0) -> torch.Tensor:
        """The weight delta scale * (alpha / rank) * up @ down in float32, shaped as the layer's
        weight (a conv LoRA's kernel: the 1x1 `up` composed with the kxk `down`)."""
        self.check(shape)
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)  # (out, r), (r, in*k*k)
        return (up @ down).mul_(scale * self._factor).reshape(tuple(shape))

    @property
    def _factor(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @torch.no_grad()
    def add_to(self, weight: torch.Tensor, scale: float = 1.0) -> None:
        """weight += delta in place: one addmm into a contiguous float32 weight (no delta-sized
        temporary), else through `delta` and a cast."""
        if weight.dtype == torch.float32 and weight.is_contiguous():
            self.check(weight.shape)
            up = self.up.to(weight).flatten(1)  # (out, r)
            down = self.down.to(weight).flatten(1)  # (r, in*k*k)
            weight.view(weight.shape[0], -1).addmm_(up, down, alpha=scale * self._factor)
        else:
            d = self.delta(weight.shape, scale).to(weight.device)
            weight.copy_((weight.float() + d).to(weight.dtype))


def layer_weights(root: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weight of each named Linear / Conv2d of `root` (a ValueError names any other)."""
    modules = dict(root.named_modules())
    out = {}
    for name in names:
        m = modules.get(name)
        if not isinstance(m, nn.Linear | nn.Conv2d):
            raise ValueError(f"{name!r} is not a Linear or Conv2d layer")
        out[name] = m.weight
    return out


@torch.no_grad()
def fuse(
    root: nn.Module,
    loras: Mapping[str, Sequence[tuple[LoraFactors, float]]],
    keep: bool = True,
) -> dict[str, torch.Tensor]:
    """Add each named layer's LoRAs ((factors, scale) pairs) to its weight in place; returns the
    original weights for `restore` (empty with keep=False: a model loaded for one use)."""
    weights = layer_weights(root, loras)
    saved = {}
    for name, items in loras.items():
        if keep:
            saved[name] = weights[name].detach().clone()
        for factors, scale in items:
            factors.add_to(weights[name], scale)
    return saved


@torch.no_grad()
def restore(root: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put back the weights `fuse` returned, exactly."""
    for name, w in layer_weights(root, saved).items():
        w.copy_(saved[name])


def target_layers(root: nn.Module, conv: bool = False) -> list[str]:
    """The layers a new LoRA trains: every attention projection (`ATTENTION_PROJECTIONS`), and
    with `conv` every Conv2d too (LoCon)."""
    names = []
    for name, m in root.named_modules():
        attn = isinstance(m, nn.Linear) and name.endswith(ATTENTION_PROJECTIONS)
        if attn or (conv and isinstance(m, nn.Conv2d)):
            names.append(name)
    return names


class LoraLayer(nn.Module):
    """Trainable factors for one layer: down as the layer's own kind (same kernel, stride and
    padding for a conv), up 1x1; up starts at zero, so a new LoRA changes nothing."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                  base.padding, base.dilation, bias=False)  # fmt: skip
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.alpha, self.scale = alpha, alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * self.scale

    def factors(self) -> LoraFactors:
        return LoraFactors(self.down.weight.detach(), self.up.weight.detach(), self.alpha)


class LoraNetwork(nn.Module):
    """LoRA layers on the named layers of `root`, added to their outputs by forward hooks
    (`attach` / `detach`); its state dict holds only the factors, keyed by layer name with
    '.' -> '_'."""

    def __init__(self, root: nn.Module, names: Iterable[str], rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        modules = dict(root.named_modules())
        self.names = list(names)
        layer_weights(root, self.names)  # every name a Linear / Conv2d
        self.layers = nn.ModuleDict(
            {n.replace(".", "_"): LoraLayer(modules[n], rank, alpha) for n in self.names}
        )
        # a weak reference: not a submodule (the state dict holds the factors alone), and a
        # deepcopy (the trainer's EMA) copies the factors, not the network they apply to
        self._root = weakref.ref(root)
        self._hooks: list = []

    def attach(self) -> LoraNetwork:
        """Start adding the LoRA outputs to the layers' outputs."""
        modules = dict(self._root().named_modules())
        for name in self.names:
            lora = self.layers[name.replace(".", "_")]
            hook = modules[name].register_forward_hook(
                lambda _m, args, out, lora=lora: out + lora(args[0]).to(out.dtype)
            )
            self._hooks.append(hook)
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def factors(self) -> dict[str, LoraFactors]:
        """{layer name: its factors}, for saving (`io/lora.py`) or fusing."""
        return {n: self.layers[n.replace(".", "_")].factors() for n in self.names}
