"""`mri serve SCAN`: the web app over a scan folder, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    scan: Path = typer.Argument(..., help="Scan folder (made by `mri demo`) or an atlas folder."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind; anything but loopback exposes the scan."
    ),
    port: int = typer.Option(8765, "--port", help="TCP port (0: any free port)."),
    model: str | None = typer.Option(
        None, "--model", help="Model to steer with, when the scan names one that cannot be loaded by name."
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the app in a browser."),
) -> None:
    """Browse a scan in a local web app: features, steering, attribution graphs, the audit report."""
    from mri.serve.app import serve as run

    run(scan, host, port, open_browser, model=model)
