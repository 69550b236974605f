"""Streaming a `wds:` dataset (`data.ShardDataset`) into training, resumable exactly.

The data order is a pure function of (seed, epoch, rank, worker), like the loop's other
randomness: epoch e's shard order is a permutation seeded by (seed, e); reading slot
j = rank * workers + worker of S = world * workers takes every S-th shard of it from j, so
each shard is read once per epoch across ranks and workers; each slot's samples pass a shuffle
buffer seeded by (seed, e, j). A slot runs through its epochs without end (no rank waits for
another's epoch to finish), and the DataLoader takes one batch from each worker in turn.

The position of each slot, (epoch, samples read this epoch), travels with every batch; the
checkpoint stores every rank's (`Trainer.save_checkpoint`). A resumed slot starts at its
epoch's shard order and replays that many samples through its shuffle buffer without decoding
them (tar bytes only), so it continues with exactly the sample the killed run would have read
next, and the DataLoader's turn starts at the worker whose batch was next.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data import ShardDataset, collate
from ..errors import UserError

_ERROR = "__stream_error__"  # a worker's fault, re-raised as a UserError in the main process


def _seed(*coords: int) -> int:
    key = 0
    for c in coords:
        key = (key * 1_000_003 + c) % (2**63)
    return key


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's endless stream of collated batches of `batch_size` samples."""

    def __init__(
        self,
        ds: ShardDataset,
        *,
        seed: int,
        rank: int,
        world: int,
        batch_size: int,
        start: list[dict] | None = None,
        rotate: int = 0,
    ) -> None:
        self.ds, self.seed, self.rank, self.world = ds, seed, rank, world
        self.batch_size, self.rotate = batch_size, rotate
        self.workers = max(1, ds.workers)
        slots = world * self.workers
        if len(ds.urls) < slots:
            raise UserError(
                f"{ds.spec!r} has {len(ds.urls)} shard(s) for {world} rank(s) x {self.workers} "
                "worker(s); each needs one at least (pack with a smaller --shard-size)"
            )
        self.start = start or StreamLoader.initial(ds)

    def shards(self, epoch: int, slot: int) -> list[str]:
        """The shards slot `slot` reads in epoch `epoch`, in order."""
        g = torch.Generator().manual_seed(_seed(self.seed, epoch))
        order = torch.randperm(len(self.ds.urls), generator=g).tolist()
        return [self.ds.urls[i] for i in order[slot :: self.world * self.workers]]

    def raw(self, epoch: int, slot: int, errors: list) -> Iterator[dict]:
        """Undecoded samples of one slot's epoch through its seeded shuffle buffer."""
        rng = random.Random(_seed(self.seed, epoch, slot))
        buffer: list[dict] = []
        for sample in self.ds.raw_samples(self.shards(epoch, slot), errors):
            buffer.append(sample)
            if len(buffer) < self.ds.shuffle:
                continue
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info else 0) + self.rotate) % self.workers
        slot = self.rank * self.workers + worker
        pos = dict(self.start[worker])
        errors: list[str] = []
        items: list[dict] = []
        while True:
            read, stream = 0, self.raw(pos["epoch"], slot, errors)
            for _ in range(pos["offset"]):  # a resumed epoch: replay without decoding
                read += next(stream, None) is not None
            del errors[:]  # counted when first read, before the checkpoint
            for sample in stream:
                read += 1
                try:
                    items.append(self.ds.decode(sample))
                except Exception as e:  # any corrupt sample is skipped and counted
                    errors.append(f"{sample.get('__key__')} in {sample.get('__url__')}: {e}")
                if len(items) == self.batch_size:
                    pos = {**pos, "offset": read, "skipped": pos["skipped"] + len(errors)}
                    last = errors[-1] if errors else None
                    del errors[:]
                    yield {**collate(items), "position": {"worker": worker, **pos},
                           "last_error": last}  # fmt: skip
                    items = []
            if read == 0:
                yield {_ERROR: f"wds: no readable sample in the shards of rank {self.rank}, "
                       f"worker {worker}: {self.shards(pos['epoch'], slot)[:3]}"}  # fmt: skip
                return
            pos = {**pos, "epoch": pos["epoch"] + 1, "offset": 0}


class StreamLoader:
    """The main process's side: a DataLoader over a `ShardStream`, the positions of this
    rank's workers (`state`), and one warning each time the count of skipped corrupt samples
    passes a power of ten."""

    def __init__(
        self,
        ds: ShardDataset,
        *,
        seed: int,
        rank: int,
        world: int,
        batch_size: int,
        consumed: int,
        start: list[dict] | None = None,
    ) -> None:
        workers = max(1, ds.workers)
        # the killed run's next batch came from worker `consumed % workers`: start there
        self.stream = ShardStream(ds, seed=seed, rank=rank, world=world, batch_size=batch_size,
                                  start=start, rotate=consumed % workers)  # fmt: skip
        self.positions = [dict(p) for p in self.stream.start]
        self._warn_at = 1  # the next power of ten of skipped samples to say
        while self._warn_at <= sum(p["skipped"] for p in self.positions):
            self._warn_at *= 10
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=ds.workers,
            prefetch_factor=4 if ds.workers else None, persistent_workers=False,
        )  # fmt: skip
        self._it = iter(loader)

    @staticmethod
    def initial(ds: ShardDataset) -> list[dict[str, Any]]:
        """The positions of a stream not read yet, one per worker."""
        return [{"epoch": 0, "offset": 0, "skipped": 0} for _ in range(max(1, ds.workers))]

    def next(self) -> dict:
        """The next batch: {"image", "label", "caption", "index"} (index -1: a stream)."""
        batch = next(self._it)
        if _ERROR in batch:
            raise UserError(batch[_ERROR])
        pos = batch.pop("position")
        last = batch.pop("last_error")
        self.positions[pos.pop("worker")] = pos
        skipped = sum(p["skipped"] for p in self.positions)
        if skipped >= self._warn_at:
            warnings.warn(f"wds: skipped {skipped} corrupt sample(s) so far (last: {last})",
                          stacklevel=2)  # fmt: skip
            while self._warn_at <= skipped:
                self._warn_at *= 10
        batch["index"] = torch.full((len(batch["label"]),), -1)
        return batch

    def state(self) -> list[dict[str, Any]]:
        """Every worker's position: {"epoch", "offset" (samples read), "skipped"}."""
        return [dict(p) for p in self.positions]


def gather_positions(ds: ShardDataset, own: list[dict] | None, world: int) -> dict:
    """Every rank's worker positions (`StreamLoader.state`; None: nothing read yet), gathered on
    every rank (a collective under torchrun): state.json's "data"."""
    own = own or StreamLoader.initial(ds)
    ranks: list = [own]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, own)
    return {"world": world, "workers": len(own), "ranks": ranks}


def resume_positions(ds: ShardDataset, saved: dict, rank: int, world: int) -> list[dict]:
    """This rank's positions from a checkpoint's "data". On another world size or worker count
    the exact position cannot carry over: every worker restarts the earliest epoch."""
    start = StreamLoader.initial(ds)
    if saved["world"] == world and saved["workers"] == len(start):
        return saved["ranks"][rank]
    epoch = min(p["epoch"] for positions in saved["ranks"] for p in positions)
    if rank == 0:
        tqdm.write(f"--resume: the stream was read by {saved['world']} rank(s) x "
                   f"{saved['workers']} worker(s), now {world} x {len(start)}: restarting "
                   f"epoch {epoch} of the data", file=sys.stderr)  # fmt: skip
    return [{**p, "epoch": epoch} for p in start]
