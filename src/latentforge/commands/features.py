"""`latentforge features train-shapes|validate`: the `--features shapes` network of `eval fid`
(`shapes/features.py`): train it, and measure how any feature network ranks degraded sets."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import json_option


@click.group("features")
def features_group() -> None:
    """Feature networks for FID, KID and precision / recall."""


@features_group.command("train-shapes")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="weights file (fp16 safetensors; default: the shipped one in "
              "latentforge/assets/features); config and accuracies go beside it, "
              "as .json")  # fmt: skip
@click.option("--steps", type=click.IntRange(min=20), default=2000, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="shapes scenes per step (plus 16 digits)")  # fmt: skip
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3,
              show_default=True, help="peak learning rate (one-cycle)")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="initialisation seed")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads (1 is fastest on a shared 2-core machine)")  # fmt: skip
def train_shapes(
    out: Path | None, steps: int, batch: int, lr: float, seed: int, threads: int
) -> None:
    """Train the shapes / digits encoder on the CPU, write its weights and print its held-out
    accuracy per head."""
    from ..shapes import features as shapes_features

    info = shapes_features.train_and_save(
        out or shapes_features.WEIGHTS, steps=steps, batch=batch, lr=lr, seed=seed,
        threads=threads,
    )  # fmt: skip
    click.echo(json.dumps(info, indent=2))


@features_group.command("validate")
@click.option("--features", default="shapes", show_default=True,
              help="a registered feature network (shapes, pixels) or inception:FILE")  # fmt: skip
@click.option("--n", "n", type=click.IntRange(min=10), default=1000, show_default=True,
              help="images per set")  # fmt: skip
@json_option
def validate(features: str, n: int, as_json: bool) -> None:
    """FID, KID and precision / recall of shapes stream 2 against stream 1: clean, blurred,
    noised, hue-rotated, without stars; and of digits halves."""
    from ..shapes import features as shapes_features

    rows = shapes_features.validation_report(features, n)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'set':<22}{'FID':>10}{'KID':>10}{'precision':>11}{'recall':>8}")
    for name, m in rows.items():
        click.echo(f"{name:<22}{m['fid']:>10.3f}{m['kid']:>10.4f}{m['precision']:>11.3f}"
                   f"{m['recall']:>8.3f}")  # fmt: skip
