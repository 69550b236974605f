"""Click commands that live outside cli.py (one module per area); cli.py adds them to the group."""

from __future__ import annotations

import click


def guidance_interval_option(f):
    """--guidance-interval LO HI, shared by the commands that sample with guidance."""
    return click.option(
        "--guidance-interval", nargs=2, type=float, default=None, metavar="LO HI",
        help="guide only at noise levels LO < sigma <= HI, one network call elsewhere "
        "(model default; '0 inf': every step)",
    )(f)  # fmt: skip


def layout_option(f):
    """--layout NAME, shared by the commands that generate from prompts (the names of
    pipelines.layout.LAYOUTS, not imported here: the CLI starts without torch)."""
    return click.option(
        "--layout", type=click.Choice(["shapes", "none"]), default=None,
        help="regional prompting: 'shapes' reads one region per object from the prompt and "
        "denoises each box under its own one-object prompt (model default; see "
        "docs/text-to-image.md)",
    )(f)  # fmt: skip
