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


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, demo_photos):
    """Every command that writes a folder names the mistake in one line (they ended in a
    FileExistsError or NotADirectoryError traceback, `amg` after loading its model)."""
    taken = tmp_path / "taken.jpg"
    taken.write_bytes(demo_photos[0].read_bytes())
    store = tmp_path / "store"
    photo = str(demo_photos[0])
    commands = {
        "amg": ["amg", photo], "predict": ["predict", photo, "--point", "5,5"],
        "blur": ["blur", photo], "export sa1b": ["export", "sa1b", str(store)],
        "export parquet": ["export", "parquet", str(store)], "quality": ["quality", str(store)],
        "report": ["report", str(store)],
    }  # fmt: skip
    for name, args in commands.items():
        result = CliRunner().invoke(app, [*args, "--out", str(taken)])
        assert result.exit_code == 1, (name, result.output)
        assert result.output.startswith(f"error: --out '{taken}' is a file: pass a folder for "), name
        assert len(result.output.strip().splitlines()) == 1, (name, result.output)
    assert taken.read_bytes() == demo_photos[0].read_bytes() and not store.exists()


def test_a_config_that_is_not_yaml_fails_in_one_line(tmp_path, demo_photos):
    broken = tmp_path / "broken.yaml"
    broken.write_text("amg:\n  points_per_side: 4\n   bad: 1\n")
    result = CliRunner().invoke(app, ["amg", str(demo_photos[0]), "--config", str(broken),
                                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: {broken}: not valid YAML at line 3, column 7 (mapping values are not allowed "
        "here): fix the file"
    )
    only_amg = tmp_path / "only_amg.yaml"  # no model: block: the bundled model, not vit_b
    only_amg.write_text("amg:\n  points_per_side: 2\n  crop_n_layers: 0\n")
    import torch

    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["amg", str(demo_photos[0]), "--config", str(only_amg),
                                          "--threads", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    finally:
        torch.set_num_threads(before)  # (process-wide: later tests' float sums follow it)
    assert result.exit_code == 0, result.output
    assert "model default on cpu, 1 torch thread(s))" in result.output


def test_a_folder_the_user_cannot_write_fails_in_one_line(tmp_path, demo_photos):
    """Every command ends on a permission (or read-only, or full disk) error in one line naming
    the path, not a traceback from the atomic writer or a lock. Run for real on a folder of mode
    555, as a user without root's override (setpriv drops it where the tests run as root)."""
    import subprocess
    import sys

    from store_helpers import as_a_plain_user

    prefix = as_a_plain_user()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    photo = str(demo_photos[0])
    for args, path in [
        (["ingest", photo, "--store", str(locked / "store")], locked / "store"),
        (["blur", photo, "--out", str(locked / "b")], locked / "b"),
    ]:
        done = subprocess.run(prefix + [sys.executable, "-m", "engine.cli", *args],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: {path}: Permission denied (make it writable for this user, or choose another path)"
        ), done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def test_every_command_turns_write_errors_into_one_line():
    from engine.cli.main import _file_errors_in_one_line, every_command

    assert all(getattr(c.callback, "__wrapped__", None) for c in every_command(app))

    import errno

    import typer

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.tmp")

    def missing():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")

    one = typer.Typer()
    one.command()(_file_errors_in_one_line(full))
    result = CliRunner().invoke(one, [])
    assert result.exit_code == 1 and result.output.strip() == (
        "error: /data/out/x.tmp: No space left on device (free some space, or choose another path)"
    )
    other = typer.Typer()
    other.command()(_file_errors_in_one_line(missing))
    # (a missing file is not a write error: the command's own checks name those)
    assert isinstance(CliRunner().invoke(other, []).exception, FileNotFoundError)
