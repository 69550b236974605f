"""The generic training loop: one process or torchrun/DDP, exact resume, atomic checkpoints.

`Trainer` knows nothing of what it trains: `training/diffusion.py` (U-Nets, with `TrainConfig`),
`training/tasks.py` (super-resolution, inpainting; `train_diffusion`) and
`training/vae_train.py` (the VAE) subclass it, and this module imports none of them, so the
training modules import one another in one direction only (tests/test_training.py checks).

Randomness is derived from (seed, step, micro-batch, rank) at every step rather than carried
in generator state, so `--resume` continues bit-exactly and each rank draws its own shard.

`--resume` takes the newest complete checkpoint, validated whole before anything is loaded
(a corrupt or partial one is skipped with a warning), and refuses a run whose settings differ
from the checkpoint's unless each change is named with `--resume-override KEY`; the settings
free to change are the config's `RESUME_FREE`. A failed write (disk full, read-only folder)
ends training with one line, the last complete checkpoint intact; what a killed run left
half-written is removed when the next run starts.

Training runs on CUDA when it is available (`LATENTFORGE_DEVICE=cpu|cuda|cuda:N` overrides):
model, EMA, in-memory dataset caches and the per-step generators live on that device, and
`--bf16` autocasts on it. On CPU nothing changes: same generators, same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..data import collate, load_dataset
from ..errors import UserError
from ..io.checkpoint import (
    CheckpointError,
    WriteError,
    check_state,
    checked_optimizer_state,
    checkpoint_dirs,
    checkpoint_step,
    flatten_optimizer,
    load_tensors,
    read_checkpoint_state,
    remove_stale_temps,
    replace_dir_atomic,
    save_tensors_atomic,
    write_error,
    write_json_atomic,
)
from ..io.model_folder import DEVICE_ENV, resolve_device, save_model_folder

CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"  # per logged window: loss, global and per-rank images/s
INTERRUPTED = 130
CACHE_ELEMENTS = 64 * 2**20  # datasets up to this many values are cached in memory (CPU)
CACHE_ELEMENTS_CUDA = 2**31  # ... on a GPU (shapes:64's 100,000 images: 1.2e9 values)
RENDER_PARALLEL_MIN = 8192  # smaller datasets are rendered in-process


_DRAW_STREAM = 1 << 40  # --oversample draws: step generators apart from the noise ones


class LoopConfig(Protocol):
    """The settings `Trainer` itself reads; a trainer's config (a dataclass: checkpoints store
    `dataclasses.asdict` of it, and `resume` reads its fields' defaults) has at least these.
    `diffusion.TrainConfig` and `vae_train.VAETrainConfig` are two. RESUME_FREE names the
    fields a `--resume` may change without `--resume-override`."""

    RESUME_FREE: ClassVar[frozenset[str]]
    data: str
    out: str
    preset: str
    max_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
    lr_schedule: str
    weight_decay: float
    grad_clip: float
    ema_decay: float
    bf16: bool
    seed: int
    sample_every: int
    ckpt_every: int
    keep_checkpoints: int
    oversample: tuple[str, ...]
    quiet: bool


def step_generator(
    seed: int, step: int, micro: int = 0, rank: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator that depends only on its coordinates (no carried state)."""
    key = ((seed * 1_000_003 + step) * 1_009 + micro) * 131 + rank
    return torch.Generator(device=device).manual_seed(key % (2**63))


def training_device() -> torch.device:
    """CUDA when available (the local rank's GPU under torchrun), else CPU.

    LATENTFORGE_DEVICE (cpu, cuda, cuda:N, mps) overrides the choice; it is checked as
    generation checks --device (`io.model_folder.resolve_device`).
    """
    name = os.environ.get(DEVICE_ENV, "").strip() or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    try:
        device = resolve_device(name)
    except UserError as e:
        raise UserError(f"{DEVICE_ENV}={name!r}: {e}") from None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        # TF32 matmuls/convolutions for the fp32 parts (EMA, optimizer, loss maths).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of a batch onto the training device (lists of captions stay as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}  # fmt: skip


class Trainer:
    """Owns model, EMA, optimizer and data for one run: the loop, checkpoints, resume, DDP.

    Subclasses define `setup` (build `self.meta` and `self.model`, the module trained),
    `compute_loss` and `sample_images`. `training/diffusion.py` trains U-Nets (pixel or
    latent space; class or text conditioning); `training/vae_train.py` the VAE.

    `compute_loss` runs the network through `self.ddp`: `self.model` itself in one process, its
    DistributedDataParallel wrapper under torchrun, since only a forward through the wrapper
    readies the reducer that all-reduces the gradients during backward.
    """

    def __init__(self, cfg: LoopConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = training_device()
        self.rank, self.world = _init_distributed(self.device)
        self.dataset = load_dataset(cfg.data, seed=cfg.seed)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
        self.setup()  # builds on CPU (same initial weights on every device), then moves
        self.model.to(self.device).train().requires_grad_(True)
        for module in self.frozen_modules():  # before DDP, which registers the trainable ones
            module.requires_grad_(False)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ddp = self.model
        # --fsdp / --grad-checkpoint (training/sharded.py): fields a config may have
        self.fsdp = getattr(cfg, "fsdp", False) and self.world > 1
        self._ema_full: dict | None = None  # the EMA gathered whole (FSDP), for one save
        if getattr(cfg, "grad_checkpoint", False):
            from .sharded import checkpoint_blocks

            checkpoint_blocks(self.model)
        if self.fsdp:
            from .sharded import shard

            shard(self.model, cfg.bf16)
            shard(self.ema, False)
        elif self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.step = 0
        self._stop = False
        self._stream, self._stream_start, self._last_batch = None, None, None  # wds: data
        self._data_wait = 0.0  # seconds spent waiting for batches since the last log line
        self._cache = self._maybe_cache_dataset()
        self._weights = self.dataset.sample_weights(cfg.oversample) if cfg.oversample else None
        if self._weights is not None and self.rank == 0 and not cfg.quiet:
            matched = self._weights != 1  # the images the rules reweight
            share = matched.double().mean().item()
            drawn = (self._weights * matched).sum() / self._weights.sum()
            tqdm.write(f"--oversample: {share:.1%} of the images, {drawn.item():.1%} of the draws")

    def setup(self) -> None:
        raise NotImplementedError

    def frozen_modules(self) -> list[nn.Module]:
        """Parts of self.model that keep their weights (no gradients, not in the optimizer)."""
        return []

    def compute_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample_images(self) -> torch.Tensor:
        raise NotImplementedError

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        """This rank's generator for (step, micro-batch), on the training device."""
        return step_generator(self.cfg.seed, step, micro, self.rank, self.device)

    def _maybe_cache_dataset(self) -> dict | None:
        """Small datasets (digits) are decoded once into memory; on a GPU, datasets up to
        CACHE_ELEMENTS_CUDA values too (rendered by worker processes), kept on the device."""
        ds = self.dataset
        limit = CACHE_ELEMENTS_CUDA if self.device.type == "cuda" else CACHE_ELEMENTS
        if ds.streamed or len(ds) * ds.channels * ds.resolution**2 > limit:
            return None
        return to_device(render_dataset(ds), self.device)

    # ----- data ------------------------------------------------------------------------------
    def _indices(self, step: int, micro: int) -> torch.Tensor:
        """Dataset indices of this rank's micro-batch: epoch-wise permutations, sharded by rank;
        with --oversample, draws with replacement by weight, a pure function of (seed, step,
        micro, rank) like the noise, so a resumed run sees the same batches."""
        B, n = self.cfg.batch_size, len(self.dataset)
        if self._weights is not None:
            g = step_generator(self.cfg.seed, _DRAW_STREAM + step, micro, self.rank)
            return torch.multinomial(self._weights, B, replacement=True, generator=g)
        global_batch = B * self.world
        start = (step * self.cfg.grad_accum + micro) * global_batch + self.rank * B
        pos = torch.arange(start, start + B)
        out = torch.empty(B, dtype=torch.long)
        for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
            perm = torch.randperm(n, generator=step_generator(self.cfg.seed, -1 - epoch))
            mask = pos.div(n, rounding_mode="floor") == epoch
            out[mask] = perm[pos[mask] % n]
        return out

    def batch(self, step: int, micro: int) -> dict:
        """{"image": (B, C, H, W), "label": (B,), "caption": list[str], "index": (B,)}."""
        if self.dataset.streamed:
            return self._stream_batch(step, micro)
        idx = self._indices(step, micro)
        if self._cache is not None:
            on = idx.to(self.device)
            out = {k: v[on] for k, v in self._cache.items() if torch.is_tensor(v)}
            out["caption"] = [self._cache["caption"][i] for i in idx.tolist()]
        else:
            out = to_device(collate([self.dataset[int(i)] for i in idx]), self.device)
        out["index"] = idx
        return out

    def _stream_batch(self, step: int, micro: int) -> dict:
        """The next batch of a stream (wds:), read in order; the latest one again when asked
        twice (the VAE's discriminator step re-reads it)."""
        from .stream import StreamLoader

        key = (step, micro)
        if self._last_batch is not None and self._last_batch[0] == key:
            return self._last_batch[1]
        consumed = step * self.cfg.grad_accum + micro
        if self._stream is None:
            self._stream = StreamLoader(
                self.dataset, seed=self.cfg.seed, rank=self.rank, world=self.world,
                batch_size=self.cfg.batch_size, consumed=consumed, start=self._stream_start,
            )  # fmt: skip
            self._stream_consumed = consumed
        if consumed != self._stream_consumed:
            raise RuntimeError(f"a stream is read in order: batch {key} asked after "
                               f"{self._stream_consumed} batches")  # fmt: skip
        batch = to_device(self._stream.next(), self.device)
        self._stream_consumed += 1
        self._last_batch = (key, batch)
        return batch

    def _data_state(self) -> dict | None:
        """A stream's position on every rank (a collective under torchrun), for state.json."""
        if not self.dataset.streamed:
            return None
        from .stream import gather_positions

        own = self._stream.state() if self._stream is not None else self._stream_start
        return gather_positions(self.dataset, own, self.world)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over warmup_steps, then constant or (lr_schedule "cosine") a half
        cosine from lr down to 0 at max_steps."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
            span = max(1, cfg.max_steps - cfg.warmup_steps)
            return (
                cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
            )
        return cfg.lr * warm

    def train_step(self) -> float:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = self.batch(self.step, micro)
            self._data_wait += time.perf_counter() - t0
            g = self.generator(self.step, micro)
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            ctx = self._no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = self.compute_loss(batch, g) / cfg.grad_accum
                loss.backward()
            total += loss.item()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return total

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        """Gradients kept on this rank (accumulated micro-batches): DDP's no_sync, FSDP's
        reduce-scatter switched off."""
        if not self.fsdp:
            with self.ddp.no_sync():
                yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up of the decay so early EMA weights are not dominated by the random init.
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema, params = list(self.ema.parameters()), [p.detach() for p in self.model.parameters()]
        if self.device.type == "cuda":  # one fused kernel instead of one launch per tensor
            torch._foreach_lerp_(ema, params, 1 - decay)
        else:
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p, 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            e.copy_(b)

    def save_samples(self) -> None:
        from ..io.images import save_grid

        images = self.sample_images()
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        try:
            save_grid(images, path)
        except OSError as e:  # written in place (a sample is no checkpoint): drop a partial one
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            raise write_error(path, e) from None

    # ----- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        data = self._data_state()
        if self.fsdp:  # every rank writes its shards
            return self._save_sharded_checkpoint(data)
        if self.rank != 0:
            return
        ckdir = self.out / CHECKPOINTS
        final = ckdir / f"step-{self.step:07d}"
        tmp = ckdir / f".tmp-step-{self.step:07d}"
        self._make_tmp(tmp)
        try:
            opt_meta = {}
            for name, obj in self.checkpointed().items():
                if isinstance(obj, torch.optim.Optimizer):
                    tensors, opt_meta[name] = flatten_optimizer(obj.state_dict())
                else:
                    tensors = _cpu(obj.state_dict())
                # one fsync per file; replace_dir_atomic syncs the folder once
                save_tensors_atomic(tmp / f"{name}.safetensors", tensors, sync_dir=False)
            self._finish_checkpoint(tmp, final, {"optimizers": opt_meta}, data)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._after_checkpoint()

    def _make_tmp(self, tmp: Path) -> None:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as e:
            raise write_error(tmp, e) from None

    def _save_sharded_checkpoint(self, data: dict | None) -> None:
        """--fsdp: every rank writes its shards (torch.distributed.checkpoint) into the temp
        folder, then rank 0 adds state.json, renames it into place and writes the model folder
        from the EMA gathered whole."""
        from .sharded import full_state, save_sharded

        ckdir = self.out / CHECKPOINTS
        final = ckdir / f"step-{self.step:07d}"
        tmp = ckdir / f".tmp-step-{self.step:07d}"
        if self.rank == 0:
            self._make_tmp(tmp)
        dist.barrier()
        modules, optimizers = self._sharded_parts()
        try:
            save_sharded(tmp, modules, optimizers)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._ema_full = full_state(self.ema)
        if self.rank == 0:
            try:
                self._finish_checkpoint(tmp, final, {"optimizers": {}, "sharded": True}, data)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._after_checkpoint()
        self._ema_full = None

    def _sharded_parts(self) -> tuple[dict, dict]:
        """checkpointed() as `sharded.save_sharded` takes it: modules, and each optimizer with
        the module whose parameters it steps (FSDP trains one: self.model)."""
        parts = self.checkpointed()
        optimizers = {k: (v, self.model) for k, v in parts.items()
                      if isinstance(v, torch.optim.Optimizer)}  # fmt: skip
        if len(optimizers) > 1:
            raise UserError(f"--fsdp trains one module with one optimizer; "
                            f"{type(self).__name__} has {len(optimizers)}")  # fmt: skip
        return {k: v for k, v in parts.items() if k not in optimizers}, optimizers

    def _finish_checkpoint(self, tmp: Path, final: Path, extra: dict, data: dict | None) -> None:
        """Rank 0: state.json into the written temp folder and its rename into place."""
        state = {"step": self.step, **extra, "config": dataclasses.asdict(self.cfg)}
        if data is not None:
            state["data"] = data
        write_json_atomic(tmp / "state.json", state, sync_dir=False)
        replace_dir_atomic(tmp, final)

    def _after_checkpoint(self) -> None:
        """Rank 0, once a checkpoint is in place: old ones pruned, the model folder refreshed."""
        # keep the newest; a folder past this step (left by a corrupt checkpoint that --resume
        # skipped) is replaced when training gets there
        kept = [p for p in checkpoint_dirs(self.out / CHECKPOINTS)
                if checkpoint_step(p) <= self.step]  # fmt: skip
        for old in kept[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.save_model()

    def checkpointed(self) -> dict:
        """Everything a checkpoint holds, by file name: modules and optimizers."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.opt}

    def save_model(self) -> None:
        """The usable model folder (EMA weights) beside the checkpoints, refreshed at each save."""
        meta = self.meta.replace(training=self.provenance())
        save_model_folder(self.out, meta, self.ema_state())

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA weights whole, on the CPU (under --fsdp: as last gathered on every rank)."""
        if self.fsdp:
            if self._ema_full is None:
                raise RuntimeError("the sharded EMA is gathered (sharded.full_state) first")
            return self._ema_full
        return _cpu(self.ema.state_dict())

    def provenance(self) -> dict:
        """model.json's `training` record: the step, the full config, the world size."""
        return {
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "world_size": self.world,
            "latentforge": __version__,
        }

    def resume(self, override: Iterable[str] = ()) -> bool:
        """Load the newest usable checkpoint under out/checkpoints; False when there is none.

        Checkpoints are tried newest first; one that is partial or corrupt (state.json, a
        weights file, shapes that do not fit the model) is skipped with a warning. The first
        readable one's settings must equal this run's but for RESUME_FREE and `override`; all
        its files are validated before anything is loaded."""
        ckdir = self.out / CHECKPOINTS
        found = checkpoint_dirs(ckdir)
        if not found:
            return False
        skipped = []
        for path in reversed(found):
            try:
                state = read_checkpoint_state(path)
                self._check_settings(state["config"], path, override)
                loaded = self._read_checkpoint(path, state)
            except CheckpointError as e:
                skipped.append((path, str(e)))
                continue
            if self.rank == 0:  # said only when a checkpoint is used; else the error says it
                for bad, why in skipped:
                    tqdm.write(f"--resume: skipping {bad}: {why}", file=sys.stderr)
            optimizers = [o for o in self.checkpointed().values()
                          if isinstance(o, torch.optim.Optimizer)]  # fmt: skip
            # the state is the checkpoint's; lr, betas, weight decay ... this run's
            settings = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                        for o in optimizers]  # fmt: skip
            if loaded is None:  # a sharded (--fsdp) checkpoint, onto any world size
                from .sharded import load_sharded

                load_sharded(path, *self._sharded_parts())
            else:
                for name, obj in self.checkpointed().items():
                    obj.load_state_dict(loaded[name])
            for opt, own in zip(optimizers, settings, strict=True):
                for group, mine in zip(opt.param_groups, own, strict=True):
                    group.update(mine)
            self.step = state["step"]
            if self.dataset.streamed and state.get("data"):
                from .stream import resume_positions

                self._stream_start = resume_positions(
                    self.dataset, state["data"], self.rank, self.world
                )
            return True
        why = "; ".join(f"{bad.name} ({why})" for bad, why in skipped)
        raise UserError(f"--resume: no usable checkpoint under {ckdir}: {why}")

    def _check_settings(self, saved: dict, path: Path, override: Iterable[str]) -> None:
        """UserError listing every setting that differs from the checkpoint's, unless it is in
        the config's RESUME_FREE or in `override`. A setting newer than the checkpoint had its
        default then."""
        free = type(self.cfg).RESUME_FREE | set(override)
        now = _as_json(dataclasses.asdict(self.cfg))  # tuples as lists, as state.json has them
        changes = []
        for f in dataclasses.fields(self.cfg):
            if f.name in free:
                continue
            if f.name in saved:
                was = saved[f.name]
            elif f.default is not dataclasses.MISSING:
                was = _as_json(f.default)
            else:
                continue
            if was != now[f.name]:
                changes.append(f"--{_flag(f.name)} was {was!r}, now {now[f.name]!r}")
        if changes:
            raise UserError(
                f"cannot resume from {path}: {'; '.join(changes)} (name each deliberate change "
                "with --resume-override KEY, e.g. --resume-override "
                f"{changes[0].split()[0].removeprefix('--')})"
            )

    def _read_checkpoint(self, path: Path, state: dict) -> dict | None:
        """Every file of the checkpoint at `path`, read and checked against this run's modules
        and optimizers (names, shapes, parameter groups): {name: state_dict}. None for a
        sharded one (--fsdp), whose index is checked here and which `sharded.load_sharded`
        reads."""
        if state.get("sharded"):
            from .sharded import check_sharded

            check_sharded(path, *self._sharded_parts())
            return None
        if self.fsdp:
            raise CheckpointError("written without --fsdp; resume it without --fsdp")
        opt_meta = state.get("optimizers") or {"optimizer": state.get("optimizer")}
        loaded = {}
        for name, obj in self.checkpointed().items():
            file = path / f"{name}.safetensors"
            if not file.is_file():
                raise CheckpointError(f"{file.name} is missing")
            try:
                tensors = load_tensors(file)
            except UserError as e:
                raise CheckpointError(f"{file.name}: {str(e).removeprefix(f'{file}: ')}") from None
            if isinstance(obj, torch.optim.Optimizer):
                loaded[name] = checked_optimizer_state(obj, tensors, opt_meta.get(name), name)
            else:
                try:
                    check_state(obj.state_dict(), tensors, file.name)
                except UserError as e:
                    raise CheckpointError(str(e)) from None
                loaded[name] = tensors
        return loaded

    # ----- the loop --------------------------------------------------------------------------
    def fit(self, resume: bool = False, override: Iterable[str] = ()) -> int:
        """Train to max_steps. Returns 0, or 130 after saving when SIGTERM/SIGINT arrived.
        `override`: settings a resume may change (`--resume-override`, see `resume`)."""
        cfg = self.cfg
        if self.rank == 0:  # what a killed run left half-written, before anything is read
            self._written(lambda: remove_stale_temps(self.out))
            self._written(lambda: remove_stale_temps(self.out / CHECKPOINTS, ".tmp-step-*"))
        if self.world > 1:
            dist.barrier()
        if resume and not self.resume(override) and self.rank == 0:
            tqdm.write(f"no checkpoint under {self.out / CHECKPOINTS}; starting from step 0")
        if (
            not resume
            and (self.out / CHECKPOINTS).exists()
            and any((self.out / CHECKPOINTS).glob("step-*"))
        ):
            raise UserError(f"{self.out} already holds checkpoints; pass --resume or a new --out")
        self._written(lambda: self.out.mkdir(parents=True, exist_ok=True))
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._request_stop)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=cfg.quiet or self.rank != 0,
            dynamic_ncols=True,
            unit="step",
        )
        t0, smoothed = time.perf_counter(), None
        log_every = getattr(cfg, "log_every", 50)  # a field a config may have
        window, t_log = [], t0
        try:
            while self.step < cfg.max_steps:
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise UserError(f"loss became {loss} at step {self.step}; lower --lr")
                smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{self.lr_at(self.step):.1e}")
                stop = self._agree_stop()
                window.append(loss)
                if self.step % log_every == 0 or self.step == cfg.max_steps or stop:
                    self._log_throughput(window, time.perf_counter() - t_log)
                    window = []
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps or stop:
                    self._written(self.save_checkpoint)
                sample = cfg.sample_every and self.step % cfg.sample_every == 0
                if sample and self.fsdp:  # every rank gathers the EMA for rank 0's grid
                    from .sharded import full_state

                    self._ema_full = full_state(self.ema)
                if self.rank == 0 and sample:
                    self._written(self.save_samples)
                self._ema_full = None
                if not window:  # the next window times training steps only, not the saves
                    t_log = time.perf_counter()
                if stop:
                    return INTERRUPTED
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        if self.rank == 0 and not cfg.quiet:
            tqdm.write(
                f"trained {self.step} steps in {time.perf_counter() - t0:.0f} s -> {self.out}"
            )
        return 0

    def _log_throughput(self, losses: list[float], seconds: float) -> None:
        """One line of OUT/train_log.jsonl (rank 0) for the steps since the last: the loss
        averaged over them and the ranks, the global images/s, each rank's images/s and the
        share of its time spent waiting for data (a collective under torchrun)."""
        images = len(losses) * self.cfg.batch_size * self.cfg.grad_accum
        stats = [sum(losses) / max(1, len(losses)), images / seconds, self._data_wait / seconds]
        own = torch.tensor(stats, device=self.device)
        self._data_wait = 0.0
        ranks = [own]
        if self.world > 1:
            ranks = [torch.zeros_like(own) for _ in range(self.world)]
            dist.all_gather(ranks, own)
        ranks = torch.stack(ranks).cpu()
        if self.rank != 0:
            return
        line = {
            "step": self.step,
            "loss": round(ranks[:, 0].mean().item(), 6),
            "lr": float(f"{self.lr_at(self.step - 1):.6g}"),
            "images_per_s": round(ranks[:, 1].sum().item(), 2),
            "rank_images_per_s": [round(v, 2) for v in ranks[:, 1].tolist()],
            "data_wait": [round(v, 4) for v in ranks[:, 2].tolist()],
        }

        def append() -> None:
            with open(self.out / TRAIN_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

        self._written(append)

    def _written(self, write: Callable[[], object]) -> None:
        """Run `write`; a failure (disk full, read-only folder) ends training with one line: the
        path, the cause and the checkpoint a --resume continues from (complete checkpoints are
        only ever renamed into place, so the last one is intact)."""
        try:
            write()
        except (OSError, WriteError) as e:
            err = e if isinstance(e, WriteError) else write_error(e.filename or self.out, e)
            found = checkpoint_dirs(self.out / CHECKPOINTS)
            last = f"; --resume continues from {found[-1].name}" if found else ""
            raise WriteError(f"{err} (at step {self.step}{last})") from None

    def _request_stop(self, signum, frame) -> None:
        self._stop = True

    def _agree_stop(self) -> bool:
        if self.world == 1:
            return self._stop
        flag = torch.tensor([int(self._stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _as_json(value: object) -> object:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _flag(key: str) -> str:
    return key.replace("_", "-")


def resume_overrides(cfg: LoopConfig, keys: Iterable[str], resume: bool) -> frozenset[str]:
    """`--resume-override` keys ("lr", "batch-size", "--seed") as config field names; a
    UserError for an unknown one, or for any without --resume."""
    keys = list(keys)
    if keys and not resume:
        raise UserError("--resume-override needs --resume")
    fields = {f.name for f in dataclasses.fields(cfg)}
    names = frozenset(k.lstrip("-").replace("-", "_") for k in keys)
    unknown = [k for k in keys if k.lstrip("-").replace("-", "_") not in fields]
    if unknown:
        raise UserError(
            f"--resume-override {unknown[0]!r}: no such setting; choose from "
            f"{', '.join(sorted(_flag(f) for f in fields))}"
        )
    return names


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _render_chunk(args: tuple) -> tuple:
    """Worker: items start..stop of a dataset, images as uint8 when that is exact."""
    ds, start, stop = args
    batch = collate([ds[i] for i in range(start, stop)])
    images = batch["image"]
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    exact = torch.equal(u8.float() / 127.5 - 1, images)
    return (u8 if exact else images).numpy(), batch["label"].numpy(), batch["caption"]


def render_dataset(ds, workers: int | None = None) -> dict:
    """Every item of `ds`, collated. Large datasets (procedural shapes: ~0.3 ms an image) are
    rendered by a pool of worker processes when the machine has more than 2 cores (or as many
    as `workers` says)."""
    if workers is None:
        workers = min(16, (os.cpu_count() or 1) - 1) if len(ds) >= RENDER_PARALLEL_MIN else 1
    if workers < 2:
        return collate([ds[i] for i in range(len(ds))])
    import multiprocessing as mp

    import numpy as np

    bounds = [*range(0, len(ds), 2048), len(ds)]
    jobs = [(ds, a, b) for a, b in itertools.pairwise(bounds)]
    # spawn, not fork: a forked child of a process that already ran OpenMP or CUDA work can hang
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        parts = pool.map(_render_chunk, jobs)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1  # the same float32 maths as io.images.from_pil
    return {
        "image": images,
        "label": torch.from_numpy(np.concatenate([p[1] for p in parts])),
        "caption": [c for p in parts for c in p[2]],
    }


def run_training(
    trainer_cls: type[Trainer],
    cfg: LoopConfig,
    resume: bool = False,
    resume_override: Iterable[str] = (),
) -> int:
    """Build `trainer_cls(cfg)` and fit it; the process group (torchrun) is torn down however
    training ends. The callers (`tasks.train_diffusion`, `vae_train.train_vae`) pick the class,
    so this loop needs no knowledge of what it trains. `resume_override`: the settings a
    resume may change (`Trainer.resume`), checked before anything is built."""
    override = resume_overrides(cfg, resume_override, resume)
    trainer = trainer_cls(cfg)
    try:
        return trainer.fit(resume, override)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
