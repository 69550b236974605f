"""Denoiser wrappers: classifier-free guidance (Ho & Salimans 2022) in one batched forward,
regional prompting (a prompt per box), and the known region of inpainting. Each is a
`DenoiserWrapper`, so samplers see the same contract D(x, sigma, **cond) -> x0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


class DenoiserWrapper(nn.Module):
    """A denoiser around `self.inner` that reads the inner one's attributes (sigma_min,
    sigma_max, ...) as its own: the one base of every denoiser wrapper."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class CFGDenoiser(DenoiserWrapper):
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
        super().__init__(denoiser)
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


class RegionalDenoiser(DenoiserWrapper):
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
        super().__init__(denoiser)

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


# ----- regions: which prompt draws which box ------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """`prompt` draws inside `box` = (x0, y0, x1, y1), fractions of the image side, origin at
    the top left."""

    prompt: str
    box: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise UserError(f"a region box is X0 Y0 X1 Y1 with 0 <= X0 < X1 <= 1, got {self.box}")
        if not self.prompt.strip():
            raise UserError("a region needs a prompt")

    def weight(self, height: int, width: int) -> torch.Tensor:
        """(height, width) map, 1 on the grid cells whose centre lies in the box, else 0."""
        x0, y0, x1, y1 = self.box
        ys = (torch.arange(height) + 0.5) / height
        xs = (torch.arange(width) + 0.5) / width
        rows = (ys >= y0) & (ys <= y1)
        cols = (xs >= x0) & (xs <= x1)
        return (rows[:, None] & cols[None, :]).float()

    def to_json(self) -> list:
        return [self.prompt, *self.box]

    @classmethod
    def from_json(cls, value: list) -> Region:
        prompt, *box = value
        return cls(str(prompt), tuple(float(v) for v in box))  # type: ignore[arg-type]


def region_conditioning(
    encoder, regions: list[list[Region]], grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """`RegionalDenoiser`'s cond tensors for per-image region lists (padded to the longest
    list with zero weights): `region_context` (B, K, T, D), `region_context_mask` (B, K, T),
    `region_weight` (B, K, H, W) on the denoiser's `grid`."""
    k_max = max(len(r) for r in regions)
    texts = sorted({r.prompt for rs in regions for r in rs})
    states, masks = encoder.encode(texts)
    index = {t: i for i, t in enumerate(texts)}
    b = len(regions)
    context = states.new_zeros(b, k_max, *states.shape[1:])
    mask = None if masks is None else masks.new_zeros(b, k_max, *masks.shape[1:])
    weight = torch.zeros(b, k_max, *grid, device=states.device)
    for i, rs in enumerate(regions):
        for k, r in enumerate(rs):
            context[i, k] = states[index[r.prompt]]
            if mask is not None:
                mask[i, k] = masks[index[r.prompt]]
            weight[i, k] = r.weight(*grid)
    out = {"region_context": context, "region_weight": weight}
    if mask is not None:
        out["region_context_mask"] = mask
    return out


# ----- inpainting's known region ----------------------------------------------------------------
class KnownRegionDenoiser(DenoiserWrapper):
    """D'(x, sigma) = D(x with its known region set to known + sigma * eps), with the x0
    estimate there replaced by the known values (the "replacement" method of Song et al. 2021 /
    Lugmayr et al. 2022).

    known, eps: (B, C, h, w) in the denoiser's space; keep: (B, 1, h, w) bool, True = known.
    """

    def __init__(self, denoiser: nn.Module, known: torch.Tensor, keep: torch.Tensor,
                 eps: torch.Tensor):  # fmt: skip
        super().__init__(denoiser)
        self.known, self.keep, self.eps = known, keep, eps

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)  # (B,1,1,1)
        x = torch.where(self.keep, self.known + s * self.eps, x)
        return torch.where(self.keep, self.known, self.inner(x, sigma, **cond))
