"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper: one batched forward."""

from __future__ import annotations

import torch
from torch import nn


class CFGDenoiser(nn.Module):
    """D_cfg = D(x, uncond) + scale * (D(x, cond) - D(x, uncond)), cond and uncond in one batch.

    `cond` / `uncond` are dicts of per-image tensors (class_labels, context, context_mask).
    At scale 1 the unconditional half is skipped entirely. `rescale` is guidance rescale
    (Lin et al. 2024, eq. 15): match the std of the guided x0 to the conditional one.
    """

    def __init__(self, denoiser: nn.Module, scale: float, uncond: dict, rescale: float = 0.0):
        super().__init__()
        self.inner = denoiser
        self.scale = scale
        self.uncond = uncond
        self.rescale = rescale

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if self.scale == 1.0:
            return self.inner(x, sigma, **cond)
        both = {k: torch.cat([self.uncond[k], v]) for k, v in cond.items()}
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        uncond_out, cond_out = self.inner(
            torch.cat([x, x]), torch.cat([sigma, sigma]), **both
        ).chunk(2)
        guided = uncond_out + self.scale * (cond_out - uncond_out)
        if self.rescale:
            dims = tuple(range(1, x.ndim))
            ratio = cond_out.std(dims, keepdim=True) / guided.std(dims, keepdim=True).clamp(
                min=1e-8
            )
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        return guided
