"""The `sa-engine` console command: one subcommand per stage and tool.

Each command group lives in its own module and registers itself here; heavy imports (torch, Ray)
happen inside the commands so that `--help` stays instant.
"""

from __future__ import annotations

import errno
import functools
from typing import Any, Callable

import typer

from engine.cli import amg, annotate, gears, predict, privacy, quality, run, store, train
from engine.damaged import DamagedFile

app = typer.Typer(
    name="sa-engine",
    help="Segment Anything data engine: shards -> privacy -> gears -> SA-1B records -> retrain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (predict, amg, store, privacy, run, gears, quality, annotate, train):
    module.register(app)


def _print_version(value: bool) -> None:
    if value:
        from engine.provenance import package_versions

        typer.echo(", ".join(f"{name} {version}" for name, version in package_versions().items()))
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True,
        help="Print the engine's version and its main dependencies' versions, and exit.",
    ),
) -> None:
    pass


def reflow_help(text: str) -> str:
    """A docstring's paragraphs with their single line breaks joined: Rich help keeps them, and
    lines wrapped for the source break raggedly at any other width. Paragraphs whose lines are a
    list or indented (and `\\b` ones) stay as written."""
    import inspect

    paragraphs = inspect.cleandoc(text).split("\n\n")
    out = []
    for paragraph in paragraphs:
        lines = paragraph.split("\n")
        kept = paragraph.startswith("\b") or any(
            line.startswith(("  ", "- ", "* ")) for line in lines[1:]
        )
        out.append(paragraph if kept else " ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _reflow_commands(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.callback is not None and command.callback.__doc__:
            command.callback.__doc__ = reflow_help(command.callback.__doc__)
    for group in typer_app.registered_groups:
        _reflow_commands(group.typer_instance)


_reflow_commands(app)

# what a file write can meet that is the user's to fix: a folder not writable for them, a
# read-only or full filesystem
_WRITE_ERRNOS = {
    errno.EACCES: "make it writable for this user, or choose another path",
    errno.EPERM: "make it writable for this user, or choose another path",
    errno.EROFS: "the filesystem is read-only: choose another path",
    errno.ENOSPC: "free some space, or choose another path",
    errno.EDQUOT: "free some space (disk quota), or choose another path",
}


def _os_errors_in_one_line(typer_app: typer.Typer) -> None:
    """Every command ends on a permission or disk-space error, or on a damaged file of a store
    (`engine.damaged`), in one line naming the path (a traceback from deep inside the atomic
    writer, a lock or pyarrow otherwise)."""
    for command in typer_app.registered_commands:
        if command.callback is not None:
            command.callback = _one_line_on_os_error(command.callback)
    for group in typer_app.registered_groups:
        _os_errors_in_one_line(group.typer_instance)


def _one_line_on_os_error(callback: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(callback)  # (typer reads the options from the wrapped signature)
    def command(*args: Any, **kwargs: Any) -> Any:
        from engine.cli.common import fail

        try:
            return callback(*args, **kwargs)
        except DamagedFile as exc:
            fail(str(exc))
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            fail(f"{exc.filename or 'a file'}: {exc.strerror} ({_WRITE_ERRNOS[exc.errno]})")

    return command


_os_errors_in_one_line(app)


if __name__ == "__main__":
    app()
