"""The `latentforge` entry point: the root group of the commands in `latentforge.commands`, and
`main`, which turns errors into one line and an exit status. The commands live in their area's
module there; nothing in that package imports this one."""

from __future__ import annotations

import sys

import click

from .commands.bench import bench
from .commands.data import data_group
from .commands.distill import distill
from .commands.edit import img2img, inpaint, interpolate
from .commands.eval import eval_group
from .commands.features import features_group
from .commands.generate import generate, sample
from .commands.lora import lora_group
from .commands.report import report_group
from .commands.sd import export, import_cmd
from .commands.serve import serve
from .commands.train import train
from .commands.upscale import upscale
from .errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="latentforge")
def cli() -> None:
    """latentforge: train, sample, edit and serve diffusion models."""


for _command in (train, sample, generate, img2img, inpaint, interpolate, upscale, eval_group,
                 report_group, bench, serve, import_cmd, export, features_group,
                 data_group, distill, lora_group):  # fmt: skip
    cli.add_command(_command)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    try:
        rv = cli.main(args=argv, prog_name="latentforge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("latentforge: aborted", err=True)
        return 130
    except _NO_ARGS_IS_HELP as e:  # bare `latentforge` / `latentforge train`: show the help
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        return 0
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        click.echo(f"latentforge: error: {e.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"latentforge: error: {e.format_message()}", err=True)
        return 2
    except UserError as e:
        click.echo(f"latentforge: error: {e}", err=True)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
