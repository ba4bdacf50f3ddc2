from typer.testing import CliRunner

from engine.cli.main import app


def test_help_lists_every_stage_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["predict", "amg", "ingest", "status", "export", "verify", "blur", "run", "serve",
                    "train", "evaluate"]:
        assert command in result.output
