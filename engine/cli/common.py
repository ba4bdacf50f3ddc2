"""Small helpers every CLI command shares: failing with a clear message, commands still to come."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def not_built(command: str, issue: int, what: str) -> NoReturn:
    fail(f"'{command}' is not built yet: it arrives with issue #{issue} ({what}).", code=2)


def placeholder(app: typer.Typer, command: str, issue: int, what: str) -> None:
    """Register a command that says which issue brings it, so `--help` shows the whole product."""

    def run() -> None:
        not_built(command, issue, what)

    run.__doc__ = f"{what} (not built yet: arrives with issue #{issue})."
    app.command(name=command)(run)
