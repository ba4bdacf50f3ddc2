from typer.testing import CliRunner

from engine.cli.main import app


def test_help_lists_every_stage_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["predict", "amg", "ingest", "status", "export", "verify", "blur", "run", "serve",
                    "train", "evaluate"]:
        assert command in result.output


def test_every_command_has_a_one_line_summary():
    """The command lists show a help's first paragraph as written: wrapped lines break mid-phrase."""
    import typer.main

    def commands(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield path + [name], sub
            yield from commands(sub, path + [name])

    for path, command in commands(typer.main.get_command(app), []):
        summary = (command.help or "").strip().split("\n\n")[0]
        assert summary, f"`sa-engine {' '.join(path)}` has no help"
        assert "\n" not in summary, f"`sa-engine {' '.join(path)}`: summary wraps: {summary!r}"
