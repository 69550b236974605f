"""Running an evaluator's model calls over n items in batches, with a progress bar and timing."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..errors import UserError


def run_batched(
    fn: Callable[[int, int], torch.Tensor],
    n: int,
    batch: int,
    *,
    progress: bool = False,
    desc: str = "sampling",
) -> tuple[torch.Tensor, float]:
    """fn(start, stop) for consecutive slices of range(n) of at most `batch` items; returns the
    results concatenated along dim 0 and the seconds spent inside fn."""
    from tqdm.auto import tqdm

    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    out, seconds = [], 0.0
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            t0 = time.perf_counter()
            out.append(fn(start, stop))
            seconds += time.perf_counter() - t0
            bar.update(stop - start)
    return torch.cat(out), seconds
