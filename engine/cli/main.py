"""The `sa-engine` console command: one subcommand per stage and tool.

Each command group lives in its own module and registers itself here; heavy imports (torch, Ray)
happen inside the commands so that `--help` stays instant.
"""

from __future__ import annotations

import typer

from engine.cli import amg, annotate, gears, predict, privacy, quality, run, store, train

app = typer.Typer(
    name="sa-engine",
    help="Segment Anything data engine: shards -> privacy -> gears -> SA-1B records -> retrain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (predict, amg, store, privacy, run, gears, quality, annotate, train):
    module.register(app)


if __name__ == "__main__":
    app()
