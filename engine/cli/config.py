"""Run configuration for the CLI: `configs/<name>.yaml` (or a path) plus `--set key=value` overrides.

Only the CLI reads YAML; the library takes typed arguments. A config is a dict of blocks, one per
stage (`amg:`, `privacy:`, `ingest:` ...); `section()` turns one block into the stage's dataclass and
rejects unknown keys and values of the wrong type, so a typo in a YAML file or a `--set` fails
loudly, before anything runs, instead of vanishing or failing deep inside a stage.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from engine.checks import invalid

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
T = TypeVar("T")


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a named config (`sa1b`, `meta-default`, ...) or a YAML file, then apply overrides.

    Arguments:
      name_or_path (str | Path): a name from `configs/` or the path of a YAML file.
      overrides (list[str]): `block.key=value` strings; values are parsed as YAML scalars/lists.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(
            f"config '{name_or_path}' not found: use one of {', '.join(config_names())} or a YAML file path"
        )
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{at} ({problem}): fix the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config must be a mapping of blocks (amg:, privacy:, ...)")
    blocks = known_blocks()
    unknown = sorted(str(b) for b in config if b not in blocks)
    if unknown:
        raise ValueError(
            f"{path}: unknown block(s) {unknown}: a misspelt block would be ignored; "
            f"blocks: {', '.join(sorted(blocks))}"
        )
    for item in overrides or []:
        block = item.partition("=")[0].strip().split(".")[0]
        if block and "=" in item and block not in blocks:
            raise ValueError(
                f"--set '{item}': no block '{block}' (it would be ignored); "
                f"blocks: {', '.join(sorted(blocks))}"
            )
    return apply_overrides(config, overrides or [])


def known_blocks() -> set[str]:
    """The blocks a config may hold: those of the packaged configs, which document every default
    (`sa1b.yaml` has them all)."""
    blocks: set[str] = set()
    for path in CONFIG_DIR.glob("*.yaml"):
        blocks.update(yaml.safe_load(path.read_text()) or {})
    return blocks


def flag_overrides(block: str, flags: dict[str, Any], address: str | None = None) -> list[str]:
    """`--set`-style overrides of `block`'s keys for the flags a command was given (None: not
    given); `address` (a command's `--address`) sets `ray.address` and `block.ray=true`."""
    import json

    out = [
        f"{block}.{key}={json.dumps(value if isinstance(value, (bool, int, float)) else str(value))}"
        for key, value in flags.items()
        if value is not None
    ]  # (JSON scalars are YAML: a stage named "on" stays a string)
    return out + ([f"ray.address={json.dumps(address)}", f"{block}.ray=true"] if address else [])


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set '{item}': expected key=value, e.g. amg.points_per_side=16")
        *parents, leaf = key.strip().split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set '{item}': '{part}' is a value, not a block")
        node[leaf] = yaml.safe_load(raw)
    return config


def section(config: dict[str, Any], block: str, cls: type[T]) -> T:
    """Build dataclass `cls` from `config[block]`, refusing keys it does not know and values not
    of their field's type (a string where a number goes would otherwise reach the stage and fail
    there with a traceback). A float written the way YAML 1.1 reads as a string (`8e-4`) is
    taken as the number it is."""
    values = config.get(block) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"config block '{block}' is {values!r}: it must be a mapping of keys (key: value lines)"
        )
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"config block '{block}' has unknown keys {unknown}; known keys: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        values[key] = _typed(value, hints[key], f"{block}.{key}")
    try:
        return cls(**values)
    except ValueError as err:  # the block's own checks: named by their key, or here by the block
        if str(err).startswith(f"{block}."):
            raise
        raise ValueError(f"config block '{block}': {err}") from None


def _typed(value: Any, hint: Any, name: str) -> Any:
    """`value` as a value of type `hint` (bool, int, float, str, list[...], X | None), or a
    ValueError naming the key, the value and the type it needs."""
    number = _as_number(value)
    if _fits(value, hint):
        return value
    if number is not None and _fits(number, hint):
        return number
    raise invalid(name, value, _describe(hint))


def _as_number(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # (NaN and infinities are no setting's value)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (
            not args or all(_fits(v, args[0]) for v in value)
        )
    return True  # (Any and other types: the dataclass checks them)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in typing.get_args(hint) else "")
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of ({_describe(args[0])})" if args else "a list"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}.get(
        hint, str(hint)
    )
