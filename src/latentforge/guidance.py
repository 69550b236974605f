"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper: one batched forward."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .errors import UserError


def parse_interval(value: Sequence[float | None] | None) -> tuple[float, float] | None:
    """A guidance interval (lo, hi) in sigma, checked; None or (0, inf) mean every step.

    hi may be None (no upper bound), as model.json stores it (JSON has no infinity).
    """
    if value is None:
        return None
    if len(value) != 2:
        raise UserError(f"a guidance interval is two sigmas LO HI, got {list(value)}")
    try:
        lo = float(value[0])
        hi = math.inf if value[1] is None else float(value[1])
    except (TypeError, ValueError):
        raise UserError(f"a guidance interval is two sigmas LO HI, got {list(value)}") from None
    if math.isnan(lo) or math.isnan(hi) or lo < 0 or hi <= lo:
        raise UserError(f"guidance interval needs 0 <= LO < HI, got {lo:g} {hi:g}")
    return None if (lo == 0 and hi == math.inf) else (lo, hi)


def interval_to_json(interval: tuple[float, float] | None) -> list:
    """The interval as model.json / PNG metadata store it: [lo, hi] with hi None for infinity;
    None (every step) is written out as [0.0, None], so a reader never falls back to a model's
    default."""
    lo, hi = (0.0, math.inf) if interval is None else interval
    return [lo, None if hi == math.inf else hi]


class _Wrapper(nn.Module):
    """A denoiser around `self.inner` that reads the inner one's attributes (sigma_min,
    sigma_max, ...) as its own."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class CFGDenoiser(_Wrapper):
    """D_cfg = D(x, uncond) + scale * (D(x, cond) - D(x, uncond)), cond and uncond in one batch.

    `cond` / `uncond` are dicts of per-image tensors (class_labels, context, context_mask).
    At scale 1 the unconditional half is skipped entirely. `rescale` is guidance rescale
    (Lin et al. 2024, eq. 15): match the std of the guided x0 to the conditional one.

    `interval` = (lo, hi) guides only at noise levels lo < sigma <= hi (Kynkaenniemi et al.
    2024, "Applying guidance in a limited interval"); elsewhere the conditional denoiser runs
    alone, one network call on the plain batch. Guidance at low noise barely changes what is
    drawn (the layout is settled by then), so skipping it there saves up to half the calls.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scale: float,
        uncond: dict,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.inner = denoiser
        self.scale = scale
        self.uncond = uncond
        self.rescale = rescale
        self.interval = interval

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if self.scale == 1.0:
            return self.inner(x, sigma, **cond)
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        if self.interval is None:
            return self._guided(x, sigma, cond)
        lo, hi = self.interval
        inside = (sigma > lo) & (sigma <= hi)
        if not inside.any():
            return self.inner(x, sigma, **cond)
        if inside.all():
            return self._guided(x, sigma, cond)
        # images at different noise levels (rare): guide only those inside the interval
        plain = self.inner(x, sigma, **cond)
        keep = inside.nonzero().squeeze(1)
        guided = self._guided(x[keep], sigma[keep], {k: v[keep] for k, v in cond.items()}, keep)
        return plain.index_copy(0, keep, guided)

    def _guided(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        uncond = self.uncond if rows is None else {k: v[rows] for k, v in self.uncond.items()}
        both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
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


class RegionalDenoiser(_Wrapper):
    """Regional prompting: each region of an image is denoised under its own prompt.

    Cond keys besides `context` / `context_mask`: `region_context` (B, K, T, D),
    `region_context_mask` (B, K, T) and `region_weight` (B, K, H, W), weights >= 0 on the
    denoiser's grid. For an image with regions (a region counts where its weight is positive
    somewhere):

        D(x) = sum_k w_k D(x, c_k) / sum_k w_k   where sum_k w_k > 0,
        D(x) = mean_k D(x, c_k)                  elsewhere (every region prompt names the
                                                 background, so they agree there).

    An image whose weights are all zero (no regions, or the unconditional half under
    CFGDenoiser) is denoised under its own `context`. Every forward of a call is one batch of
    the inner denoiser, so an image with two regions costs two rows. This is the composition
    of layout-grounded generation (Lian et al. 2024, LLM-grounded Diffusion; the Regional
    Prompter of the SD web UIs): a small model that draws one object right but binds the
    attributes of two wrongly is asked for one object per region.
    """

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.inner = denoiser

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        *,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        region_context: torch.Tensor | None = None,
        region_context_mask: torch.Tensor | None = None,
        region_weight: torch.Tensor | None = None,
        **cond,
    ) -> torch.Tensor:
        if region_weight is None:
            return self.inner(x, sigma, context=context, context_mask=context_mask, **cond)
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        active = region_weight.flatten(2).amax(2) > 0  # (B, K)
        laid_out = active.any(1)
        plain = (~laid_out).nonzero().squeeze(1)
        rows, regions = active.nonzero(as_tuple=True)
        every = torch.cat([plain, rows])
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        if region_context_mask is None:
            region_context_mask = torch.ones(
                region_context.shape[:3], dtype=torch.bool, device=x.device
            )
        out = self.inner(
            x[every],
            sigma[every],
            context=torch.cat([context[plain], region_context[rows, regions]]),
            context_mask=torch.cat([context_mask[plain], region_context_mask[rows, regions]]),
            **{k: v[every] for k, v in cond.items()},
        )
        result = torch.empty_like(x)
        result[plain] = out[: len(plain)]
        parts = out[len(plain) :]
        # per (row, region) pair: its weight map, and 1 / (number of regions of its row)
        weight = region_weight[rows, regions].unsqueeze(1).to(parts.dtype)  # (N, 1, H, W)
        share = (1.0 / active.sum(1).to(parts.dtype))[rows].view(-1, 1, 1, 1)
        num = torch.zeros_like(x).index_add_(0, rows, weight * parts)
        cover = torch.zeros_like(x[:, :1]).index_add_(0, rows, weight)
        mean = torch.zeros_like(x).index_add_(0, rows, share * parts)
        blended = torch.where(cover > 0, num / cover.clamp(min=1e-12), mean)
        result[laid_out] = blended[laid_out]
        return result
