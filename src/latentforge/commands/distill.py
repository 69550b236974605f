"""`latentforge distill`: a few-step student of a model folder (LCM or progressive distillation)."""

from __future__ import annotations

import click

from .options import quiet_option, seed_option
from .train import resume_option


@click.command("distill")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="the teacher: a class or text diffusion model folder (vp)")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="student folder")
@click.option("--method", type=click.Choice(["lcm", "progressive"]), default="lcm",
              show_default=True, help="latent consistency or progressive distillation")  # fmt: skip
@click.option("--steps", type=click.IntRange(1, 50), default=4, show_default=True,
              help="lcm: the student's default sampling steps")  # fmt: skip
@click.option("--from-steps", type=click.IntRange(min=2), default=16, show_default=True,
              help="progressive: the teacher's DDIM steps")  # fmt: skip
@click.option("--to-steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="progressive: the student's steps (from-steps / 2^rounds)")  # fmt: skip
@click.option("--data", default="", help="training data spec [default: the teacher's]")
@click.option("--ddim-timesteps", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="lcm: the teacher's skipping-step grid (k = 1000 / this)")  # fmt: skip
@click.option("--guidance-min", type=float, default=1.0, show_default=True,
              help="the guidance scale is drawn per example from [min, max]")  # fmt: skip
@click.option("--guidance-max", type=float, default=5.0, show_default=True)
@click.option("--guidance", type=float, default=None,
              help="the student's default guidance scale [default: the teacher's]")  # fmt: skip
@click.option("--loss", type=click.Choice(["huber", "l2"]), default="huber", show_default=True,
              help="lcm: the distance to the target")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="training steps (per halving round, progressive)")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True)  # fmt: skip
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="lcm: the target network's EMA decay (its weights are saved)")  # fmt: skip
@click.option("--ckpt-every", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="keep the encoded latents and captions here for the next run")  # fmt: skip
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast for the forward passes")
@seed_option()
@resume_option
@quiet_option
def distill(model_dir: str, resume: bool, resume_override: tuple[str, ...], **kw) -> int:
    """Distil MODEL into a few-step student with the guidance folded in (docs/few-step.md)."""
    from ..training.distill import DistillConfig
    from ..training.distill import distill as run

    return run(DistillConfig(model=model_dir, **kw), resume, resume_override)
