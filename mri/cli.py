"""The `mri` command: one subcommand per stage, plus `demo`.

Every command turns an `MriError` into a one-line message and exit code 2, so bad input never ends in a
deep traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mri.atlas.commands import atlas_app, show
from mri.audit.commands import audit_app
from mri.data.commands import record
from mri.dictionaries.commands import dict_app
from mri.errors import MriError
from mri.explain.commands import explain
from mri.serve.commands import serve
from mri.steer.commands import steer_app
from mri.trace.commands import trace_app
from mri.zoo.commands import zoo_app

console = Console(stderr=True)
_app = typer.Typer(help="mri: an MRI for AI.", no_args_is_help=True, pretty_exceptions_enable=False)
_app.add_typer(zoo_app, name="zoo")
_app.command("record")(record)
_app.add_typer(dict_app, name="dict")
_app.add_typer(atlas_app, name="atlas")
_app.command("show")(show)
_app.command("explain")(explain)
_app.add_typer(steer_app, name="steer")
_app.add_typer(trace_app, name="trace")
_app.add_typer(audit_app, name="audit")
_app.command("serve")(serve)


@_app.command("demo")
def demo(
    out: Path = typer.Option(Path("scan"), "--out", help="Scan folder to write."),
    model: str = typer.Option("mri-base", "--model", help="Model folder or shipped organism."),
    corpus: Path | None = typer.Option(None, "--corpus", help="Corpus (default: the shipped sample)."),
    tokens: int = typer.Option(65536, "--tokens", help="Tokens to record."),
    serve_scan: bool = typer.Option(True, "--serve/--no-serve", help="Serve the scan when it is written."),
    port: int = typer.Option(8765, "--port", help="Port for the web app (127.0.0.1)."),
) -> None:
    """Run the whole pipeline on a shipped organism and the shipped corpus sample, then serve the scan."""
    from mri.demo import run_demo

    run_demo(out, model, corpus, tokens)
    if serve_scan:
        from mri.serve.app import serve as serve_app

        serve_app(out, port=port)


@_app.command("sites")
def sites(
    model: str = typer.Argument(..., help="Model folder, shipped organism name, or hub name."),
    text: str = typer.Option(
        "The model reads this.", help="A text whose forward pass shows each site's shape."
    ),
) -> None:
    """List a model's sites with their shapes on a short text."""
    from rich.table import Table

    from mri.models import load

    m = load(model)
    ids = m.to_tokens(text)
    out = m.run(ids, read=m.site_names, stop=False)
    table = Table(title=f"{m.name}: {m.family}, {m.n_layers} blocks, d_model {m.d_model}")
    for col in ("site", "short form", "shape", "mean |x|"):
        table.add_column(col)
    for name in m.site_names:
        value = out.cache[name]
        short = name.replace("blocks.", "L").replace(".hook_", ".").replace(".attn.hook_pattern", ".pattern")
        table.add_row(name, short, str(tuple(value.shape)), f"{value.float().abs().mean():.3f}")
    Console().print(table)


def _click_exception_types() -> tuple[type[BaseException], ...]:
    """The click exception classes a usage error can be raised as.

    typer 0.29 bundles its own copy of click (`typer._click`), so a usage error from our app is not an
    instance of the standalone `click.ClickException`; both are caught so that whichever click typer uses, a
    missing option or an unknown command prints click's usage message and exits 2 instead of a traceback.
    """
    types: list[type[BaseException]] = []
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        types.append(TyperClickException)
    except ImportError:  # an older typer that uses the standalone click
        pass
    try:
        import click

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)


def app() -> None:
    """Console-script entry point: run the CLI, printing MriError as a clear message and click usage errors
    as click's own usage message (exit 2), never as a traceback."""
    try:
        code = _app(prog_name="mri", standalone_mode=False)
    except MriError as e:
        # soft_wrap: one line however long; escape: a message like "unknown fields ['x']" is not markup
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except _click_exception_types() as e:
        e.show()
        sys.exit(e.exit_code)
    # Non-standalone click returns the exit code of an explicit `ctx.exit(n)` (e.g. after --help).
    if isinstance(code, int) and not isinstance(code, bool):
        sys.exit(code)
