"""Benchmarks behind `latentforge bench NAME`. Each module defines its click `command` (the
options next to the code that reads them, the module docstring as its --help) and
`main(argv) -> int` for its script in bench/; `commands/bench.py` imports a module only when
its benchmark runs or shows its help."""

from __future__ import annotations

import click

# every benchmark command gets -h as well as --help, run from `latentforge` or from its script
CONTEXT = {"help_option_names": ["-h", "--help"]}


def one_line(doc: str | None) -> str:
    """The one-line help `latentforge bench --help` lists: the module docstring's first line
    without its "`latentforge bench NAME`: " prefix, capitalised like the other commands'."""
    first = (doc or "").strip().split("\n", 1)[0].split(": ", 1)[-1]
    return first[:1].upper() + first[1:]


def script_main(command: click.Command, argv: list[str] | None) -> int:
    """Run a benchmark command as `python bench/NAME.py ARGS` does: usage errors print click's
    message and give exit status 2 (as argparse did), --help gives 0."""
    try:
        rv = command.main(
            args=argv, prog_name=f"latentforge bench {command.name}", standalone_mode=False
        )
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0
