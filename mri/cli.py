"""The `mri` command: one subcommand per stage, plus `demo`.

Every command turns an `MriError` into a one-line message and exit code 2, so bad input never ends in a
deep traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from mri.data.commands import record
from mri.errors import MriError
from mri.zoo.commands import zoo_app

console = Console(stderr=True)
_app = typer.Typer(help="mri: an MRI for AI.", no_args_is_help=True, pretty_exceptions_enable=False)
_app.add_typer(zoo_app, name="zoo")
_app.command("record")(record)


def app() -> None:
    """Console-script entry point: run the CLI, printing MriError as a clear message."""
    try:
        _app(standalone_mode=False)
    except MriError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
