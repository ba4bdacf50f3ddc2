"""The `sa-engine` console command: one subcommand per stage and tool.

Each command group lives in its own module and registers itself here; heavy imports (torch, Ray)
happen inside the commands so that `--help` stays instant.
"""

from __future__ import annotations

import errno
import functools
from typing import Any, Callable, Iterator

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


def every_command(typer_app: typer.Typer) -> Iterator[typer.models.CommandInfo]:
    """Each command of the app, those of its groups (`run`, `export`) included."""
    yield from typer_app.registered_commands
    for group in typer_app.registered_groups:
        yield from every_command(group.typer_instance)


for _command in every_command(app):
    if _command.callback is not None and _command.callback.__doc__:
        _command.callback.__doc__ = reflow_help(_command.callback.__doc__)

# what a file write can meet that is the user's to fix: a folder not writable for them, a
# read-only or full filesystem
_WRITE_ERRNOS = {
    errno.EACCES: "make it writable for this user, or choose another path",
    errno.EPERM: "make it writable for this user, or choose another path",
    errno.EROFS: "the filesystem is read-only: choose another path",
    errno.ENOSPC: "free some space, or choose another path",
    errno.EDQUOT: "free some space (disk quota), or choose another path",
}


def _file_errors_in_one_line(callback: Callable[..., Any]) -> Callable[..., Any]:
    """The command, ending on a permission or disk-space error, or on a damaged file of a store
    (`engine.damaged`), in one line naming the path (a traceback from deep inside the atomic
    writer, a lock or pyarrow otherwise)."""

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


for _command in every_command(app):
    if _command.callback is not None:
        _command.callback = _file_errors_in_one_line(_command.callback)


if __name__ == "__main__":
    app()
