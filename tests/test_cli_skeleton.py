from typer.testing import CliRunner

from engine.cli.main import app


def test_help_lists_every_stage_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["predict", "amg", "ingest", "status", "export", "verify", "blur", "run", "serve",
                    "train", "evaluate"]:
        assert command in result.output


def test_version_names_the_engine_and_what_decides_its_outputs():
    from importlib import metadata

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert f"sa-engine {metadata.version('sa-engine')}" in result.output
    assert f"torch {metadata.version('torch')}" in result.output and "python 3." in result.output


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


def test_config_options_name_blocks_and_keys_the_config_has():
    """--config says which blocks a command reads and --set's example is a real key: both are
    checked against configs/sa1b.yaml, so a renamed block or key cannot leave the help behind."""
    import re

    import typer.main

    from engine.cli.config import load_config

    sa1b = load_config("sa1b")

    def commands(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield path + [name], sub
            yield from commands(sub, path + [name])

    seen = 0
    for path, command in commands(typer.main.get_command(app), []):
        options = {p.name: p for p in getattr(command, "params", [])}
        if "config" not in options:
            continue
        seen += 1
        where = f"`sa-engine {' '.join(path)}`"
        blocks = re.findall(r"(\w+):", options["config"].help.split("reads its", 1)[1])
        assert blocks, f"{where} --config does not say which blocks it reads"
        for block in blocks:
            assert block in sa1b or block in sa1b.get("train", {}), f"{where}: no {block}: block"
        example = re.search(r"e\.g\. (\S+)=", options["set_"].help).group(1)
        node = sa1b
        for part in example.split("."):
            assert isinstance(node, dict) and part in node, f"{where}: --set example {example}"
            node = node[part]
    assert seen >= 12


def test_help_paragraphs_reflow_to_the_terminal():
    """Rich help keeps a docstring's single line breaks (wrapped for the source, ragged at any
    other width): they are joined; lists stay as written."""
    from engine.cli.main import reflow_help

    text = """First line.

        A paragraph wrapped
        for the source.

        Steps:
        - one
        - two
        """
    assert reflow_help(text) == "First line.\n\nA paragraph wrapped for the source.\n\nSteps:\n- one\n- two"
    result = CliRunner().invoke(app, ["run", "auto", "--help"], env={"COLUMNS": "200"})
    assert "unless a model is named. A model without weights" in result.output
