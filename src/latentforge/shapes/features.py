"""`--features shapes`: a small CNN trained on the shapes attribute records (and digits labels),
whose pooled embedding is the feature space of FID, KID and precision / recall for this
project's own images.

Inception-v3's features come from ImageNet photographs; the shapes scenes (flat palette colours,
four shapes, a 3x3 grid) and 16 px digits are far from them. This encoder is trained supervised
on exactly what the records hold, with one linear head per attribute over the embedding:

- ``presence``: which of the 4 x 8 (shape, colour) pairs are in the scene (multi-label);
- ``count``: one or two objects;
- ``size``: which of the 4 x 2 (shape, size) pairs are there (multi-label);
- ``position``: which cells of the 3x3 grid hold an object (multi-label);
- ``background``: the background colour (9 classes);
- ``digits``: the digit of a scikit-learn digit, 16 px upsampled to 64 (10 classes).

The feature is that embedding: the last convolution's global max and mean pools, each channel
standardised by its training statistics, not L2-normalised (docs/metrics.md has the validation
that chose it). Any image is resized to 64 px first (bicubic with antialiasing, as `eval fid`
resizes); grey images arrive as RGB.

The shipped weights (``assets/features/shapes.safetensors``, fp16, beside ``shapes.json``: the
config, the command, data seeds and held-out accuracy per head) come from

    latentforge features train-shapes --out src/latentforge/assets/features/shapes.safetensors

(about 8 minutes on one CPU thread; one thread beats two on a shared two-core machine).
Importing this module registers the network (`metrics.fid_eval.register_features`); the
weights are read when `--features shapes` is first used.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import load_dataset
from ..errors import UserError
from ..io.checkpoint import load_state_strict, load_tensors, save_tensors_atomic, write_json_atomic
from ..metrics.fid_eval import register_features
from .scenes import (
    BACKGROUND_COLOURS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    render_shapes,
    shapes_record,
)

RESOLUTION = 64
WEIGHTS = Path(__file__).parents[1] / "assets" / "features" / "shapes.safetensors"
TRAIN_SEED = 100  # the shapes stream the network trains on (models train on 0, eval uses 1)
VAL_SEED = 101  # the held-out shapes stream its accuracies are measured on
VAL_IMAGES = 1000
DIGITS_HELD_OUT = 397  # digits (of 1,797) kept out of training, chosen by a seeded permutation
DIGITS_BATCH = 16  # digits per training step, beside the shapes scenes

BACKGROUNDS = list(BACKGROUND_COLOURS)
SIZE_NAMES = list(SIZES)
# head -> number of outputs, and whether it is multi-label (binary cross-entropy per output)
HEADS: dict[str, tuple[int, bool]] = {
    "presence": (len(SHAPES) * len(COLOURS), True),
    "count": (2, False),
    "size": (len(SHAPES) * len(SIZE_NAMES), True),
    "position": (len(POSITIONS), True),
    "background": (len(BACKGROUNDS), False),
    "digits": (10, False),
}
SHAPES_HEADS = ("presence", "count", "size", "position", "background")


@dataclass(frozen=True)
class EncoderConfig:
    """Channels of the stages: two convolutions each, the first of which halves the side
    (64 -> 32 -> 16 -> 8 px). The embedding is the last stage's max and mean pools."""

    widths: tuple[int, ...] = (32, 64, 128)

    @property
    def embed(self) -> int:
        return 2 * self.widths[-1]


class ShapesEncoder(nn.Module):
    """Conv-BN-ReLU stages over RGB plus two coordinate channels (so that the pooled embedding
    can say where things are); the last stage's global max pool (what is there: the heads
    learn fast from it) and mean pool (how much of it: where blur and noise show), standardised
    per channel by the training statistics (BatchNorm without affine), so that both weigh alike
    in a distance; one linear head per attribute over that embedding."""

    def __init__(self, config: EncoderConfig = EncoderConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin = 5  # RGB + (x, y)
        for width in config.widths:
            layers += [_conv(cin, width, 2), _conv(width, width, 1)]
            cin = width
        self.trunk = nn.Sequential(*layers)
        self.norm = nn.BatchNorm1d(config.embed, affine=False)
        self.heads = nn.ModuleDict({k: nn.Linear(config.embed, n) for k, (n, _) in HEADS.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, embed)."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        f = self.trunk(torch.cat([x, xs, ys], 1))  # (B, C, 8, 8)
        return self.norm(torch.cat([f.amax((2, 3)), f.mean((2, 3))], 1))  # (B, 2C)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.embed(x)
        return {k: head(z) for k, head in self.heads.items()}


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def to_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 1 or 3, H, W) in [-1, 1] -> (B, 3, 64, 64) float32, resized as `eval fid` does."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True)
        x = x.clamp(-1, 1)
    return x


# ---------------------------------------------------------------- data


def record_targets(record: dict) -> dict[str, torch.Tensor]:
    """The shapes heads' targets for one attribute record."""
    presence = torch.zeros(len(SHAPES), len(COLOURS))
    size = torch.zeros(len(SHAPES), len(SIZE_NAMES))
    position = torch.zeros(len(POSITIONS))
    for o in record["objects"]:
        s = SHAPES.index(o["shape"])
        presence[s, COLOURS.index(o["colour"])] = 1
        size[s, SIZE_NAMES.index(o["size"])] = 1
        position[POSITIONS.index(o["position"])] = 1
    return {
        "presence": presence.flatten(),
        "count": torch.tensor(len(record["objects"]) - 1),
        "size": size.flatten(),
        "position": position,
        "background": torch.tensor(BACKGROUNDS.index(record["background"])),
    }


def shapes_batch(seed: int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images ``start .. start + n - 1`` of shapes stream ``seed`` at 64 px and their targets."""
    records = [shapes_record(i, seed, RESOLUTION) for i in range(start, start + n)]
    targets = [record_targets(r) for r in records]
    return _render(records), {k: torch.stack([t[k] for t in targets]) for k in SHAPES_HEADS}


def _render(records: list[dict]) -> torch.Tensor:
    pixels = np.stack([np.asarray(render_shapes(r)) for r in records])  # (n, 64, 64, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 64, 64)


def digits_split(seed: int = TRAIN_SEED) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """((train images, labels), (held-out images, labels)): 16 px digits resized to 64 px."""
    ds = load_dataset("digits:16")
    images = to_input(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    labels = torch.tensor([ds[i]["label"] for i in range(len(ds))])
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    held, train = order[:DIGITS_HELD_OUT], order[DIGITS_HELD_OUT:]
    return (images[train], labels[train]), (images[held], labels[held])


# ---------------------------------------------------------------- training


def _loss(logits: torch.Tensor, target: torch.Tensor, multi: bool) -> torch.Tensor:
    if multi:  # summed over the labels: rare positives are not averaged away
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)
    return F.cross_entropy(logits, target)


def train_encoder(
    *,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    config: EncoderConfig = EncoderConfig(),
    progress: bool = False,
) -> ShapesEncoder:
    """Train on a fresh stream of shapes scenes (seed TRAIN_SEED; every step new images) and
    the training digits, with AdamW on a one-cycle schedule (warm-up, cosine decay); the same
    seed and thread count give the same weights."""
    torch.manual_seed(seed)
    # channels-last convolutions are about 3x faster on the CPU
    net = ShapesEncoder(config).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    (digit_x, digit_y), _ = digits_split()
    g = torch.Generator().manual_seed(seed)
    net.train()
    bar = tqdm(range(steps), desc="training the shapes encoder", disable=not progress)
    for step in bar:
        x, targets = shapes_batch(TRAIN_SEED, step * batch, batch)
        pick = torch.randint(len(digit_y), (DIGITS_BATCH,), generator=g)
        out = net(torch.cat([x, digit_x[pick]]).contiguous(memory_format=torch.channels_last))
        losses = {k: _loss(out[k][:batch], targets[k], HEADS[k][1]) for k in SHAPES_HEADS}
        losses["digits"] = _loss(out["digits"][batch:], digit_y[pick], False)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
    return net.eval()


@torch.no_grad()
def head_accuracy(
    net: ShapesEncoder, n: int = VAL_IMAGES, seed: int = VAL_SEED
) -> dict[str, float]:
    """Held-out accuracy per head: shapes stream ``seed`` (a multi-label head is right when all
    its outputs are) and the held-out digits."""
    net.eval()
    right: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
    for start in range(0, n, 250):
        x, targets = shapes_batch(seed, start, min(250, n - start))
        out = net(x)
        for k in SHAPES_HEADS:
            if HEADS[k][1]:
                right[k].append(((out[k] > 0) == (targets[k] > 0.5)).all(1))
            else:
                right[k].append(out[k].argmax(1) == targets[k])
    _, (digit_x, digit_y) = digits_split()
    right["digits"].append(net(digit_x)["digits"].argmax(1) == digit_y)
    return {k: round(torch.cat(v).float().mean().item(), 4) for k, v in right.items()}


# ---------------------------------------------------------------- the shipped network


def save_encoder(net: ShapesEncoder, path: Path, info: dict) -> None:
    """fp16 weights (integer buffers as they are) and, beside them, ``<stem>.json``."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(path, state, {"config": json.dumps(asdict(net.config))})
    write_json_atomic(path.with_suffix(".json"), {"config": asdict(net.config), **info})


def load_encoder(path: str | Path = WEIGHTS) -> ShapesEncoder:
    """The encoder from a weights file written by `save_encoder` (fp16 read back as fp32)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        config = json.loads(meta_path.read_text())["config"]
        config = EncoderConfig(widths=tuple(config["widths"]))
        if not config.widths or not all(isinstance(w, int) and w > 0 for w in config.widths):
            raise ValueError(f"widths must be positive integers, got {config.widths}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: no readable feature-network config ({e})") from None
    net = ShapesEncoder(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_tensors(path).items()}
    load_state_strict(net, state, f"shapes feature network {path}")
    return net.eval()


class ShapesFeatures:
    """The `--features shapes` callable: (B, C, H, W) in [-1, 1] -> (B, embed) float64."""

    def __init__(self, net: ShapesEncoder) -> None:
        self.net = net

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.net.embed(to_input(images.cpu())).double().numpy()


def shapes_features(path: str | Path = WEIGHTS) -> ShapesFeatures:
    """The shipped (or another) shapes feature network."""
    return ShapesFeatures(load_encoder(path))


register_features("shapes", shapes_features)


# ---------------------------------------------------------------- validation


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, ``sigma`` in pixels, edges reflected."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # rows
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # columns


def add_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Additive Gaussian noise of ``std`` (in [-1, 1] units), seeded, clamped to [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (images + std * torch.randn(images.shape, generator=g)).clamp(-1, 1)


def rotate_hue(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """RGB images rotated by ``degrees`` about the grey axis (a hue rotation that keeps grey
    grey), clamped to [-1, 1]."""
    a = math.radians(degrees)
    u = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    rot = math.cos(a) * torch.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * torch.outer(u, u)
    # Rodrigues' rotation about u, applied to the colour of every pixel: (B, 3, H, W)
    return torch.einsum("ij,bjhw->bihw", rot, images).clamp(-1, 1)


def shapes_images(n: int, seed: int, exclude_shape: str | None = None) -> torch.Tensor:
    """(n, 3, 64, 64) shapes scenes of stream ``seed``; with ``exclude_shape``, every scene
    holding that shape is redrawn (a set with one mode dropped)."""

    def exclude(record: dict) -> bool:
        return any(o["shape"] == exclude_shape for o in record["objects"])

    return _render([
        shapes_record(i, seed, RESOLUTION, exclude=exclude if exclude_shape else None)
        for i in range(n)
    ])  # fmt: skip


DEGRADATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **{f"blur {s}": functools.partial(gaussian_blur, sigma=s) for s in (0.5, 1.0, 2.0)},
    **{f"noise {s}": functools.partial(add_noise, std=s) for s in (0.05, 0.1, 0.2)},
    **{f"hue {d}": functools.partial(rotate_hue, degrees=d) for d in (15, 45, 90)},
    "channel swap": lambda x: x.flip(1),
}


def validation_report(features: str = "shapes", n: int = 1000) -> dict[str, dict[str, float]]:
    """FID of a shapes stream (seed 2) against another (seed 1), clean and under every
    degradation; precision / recall of the full stream and of one without stars; FID between
    the two halves of the digits and of one half blurred / noised."""
    from ..metrics.distribution import distribution_metrics
    from ..metrics.fid_eval import feature_network

    net = feature_network(features)
    real, other = net(shapes_images(n, 1)), shapes_images(n, 2)
    rows: dict[str, dict[str, float]] = {}

    def score(name: str, a: np.ndarray, b: np.ndarray) -> None:
        m = distribution_metrics(a, b)
        rows[name] = {k: round(float(m[k]), 4) for k in ("fid", "kid", "precision", "recall")}

    score("real (seed 2)", real, net(other))
    for name, degrade in DEGRADATIONS.items():
        score(name, real, net(degrade(other)))
    score("no stars (seed 2)", real, net(shapes_images(n, 2, exclude_shape="star")))
    digits = torch.stack([it["image"] for it in load_dataset("digits:16")])  # (1797, 1, 16, 16)
    half = len(digits) // 2
    digits_a, digits_b = net(digits[:half]), digits[half : 2 * half]
    score("digits: other half", digits_a, net(digits_b))
    score("digits: blur 1", digits_a, net(gaussian_blur(digits_b, 1.0)))
    score("digits: noise 0.1", digits_a, net(add_noise(digits_b, 0.1)))
    return rows


def train_and_save(
    out: str | Path = WEIGHTS,
    *,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 1,
    progress: bool = True,
) -> dict:
    """Train the encoder, write its fp16 weights to ``out`` and ``out.json``, and measure the
    held-out accuracy of what was written; returns the JSON's content."""
    out = Path(out)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        net = train_encoder(steps=steps, batch=batch, lr=lr, seed=seed, progress=progress)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    save_encoder(net, out, {})
    info = {
        "command": f"OMP_NUM_THREADS={threads} latentforge features train-shapes --out {out} "
        f"--steps {steps} --batch {batch} --lr {lr:g} --seed {seed} --threads {threads}",
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_seconds": round(seconds, 1),
        "data": {"shapes_train_seed": TRAIN_SEED, "shapes_train_images": steps * batch,
                 "digits_train_images": steps * DIGITS_BATCH,
                 "shapes_val_seed": VAL_SEED, "shapes_val_images": VAL_IMAGES,
                 "digits_held_out": DIGITS_HELD_OUT, "digits_split_seed": TRAIN_SEED},
        # measured on the fp16 weights as written
        "held_out_accuracy": head_accuracy(load_encoder(out)),
    }  # fmt: skip
    save_encoder(net, out, info)
    return {"config": asdict(net.config), **info}
