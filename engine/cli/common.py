"""Small helpers every CLI command shares: failing with a clear message, commands still to come."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def require_weights(model: str, checkpoint: object, random_weights: bool | None = None) -> None:
    """Fail unless the model has weights: a --checkpoint, or a registry entry that ships its own
    (the bundled "default"). random_weights: the command's --random-weights flag, if it has one."""
    from engine.model import PACKAGED_CHECKPOINTS

    if checkpoint is not None or random_weights or str(model) in PACKAGED_CHECKPOINTS:
        return
    untrained = "; --random-weights runs an untrained model" if random_weights is not None else ""
    fail(
        f"model '{model}' has no bundled weights: --checkpoint is required (e.g. "
        f"sam_vit_b_01ec64.pth), or use --model default (the bundled model){untrained}"
    )


def not_built(command: str, issue: int, what: str) -> NoReturn:
    fail(f"'{command}' is not built yet: it arrives with issue #{issue} ({what}).", code=2)


def placeholder(app: typer.Typer, command: str, issue: int, what: str) -> None:
    """Register a command that says which issue brings it, so `--help` shows the whole product."""

    def run() -> None:
        not_built(command, issue, what)

    run.__doc__ = f"{what} (not built yet: arrives with issue #{issue})."
    app.command(name=command)(run)
