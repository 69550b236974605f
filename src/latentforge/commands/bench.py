"""`latentforge bench NAME [OPTIONS]`: the benchmarks in latentforge/benchmarks/ as subcommands.

Each benchmark module defines its own click command (options and --help beside the code that
reads them); this group imports a module only when that benchmark is run or asked for help,
since they import torch, the models and the trainers.
"""

from __future__ import annotations

import importlib

import click

# subcommand -> module in latentforge.benchmarks
BENCHMARKS = {
    "generate": "generate",
    "latent-vs-pixel": "latent_pixel",
    "lora": "lora",
    "samplers": "samplers",
    "sd": "sd",
    "unet": "unet",
}


class _BenchmarkGroup(click.Group):
    """A group whose commands are loaded from their benchmark module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(BENCHMARKS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in BENCHMARKS:
            return None
        module = importlib.import_module(f"latentforge.benchmarks.{BENCHMARKS[cmd_name]}")
        return module.command


@click.group(cls=_BenchmarkGroup)
def bench() -> None:
    """Run a benchmark (prints a table, or JSON with --json); `bench NAME --help` for options."""
