"""Run configuration for the CLI: `configs/<name>.yaml` (or a path) plus `--set key=value` overrides.

Only the CLI reads YAML; the library takes typed arguments. A config is a dict of blocks, one per
stage (`amg:`, `privacy:`, `ingest:` ...); `section()` turns one block into the stage's dataclass and
rejects unknown keys, so a typo in a YAML file or a `--set` fails loudly instead of vanishing.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

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
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config must be a mapping of blocks (amg:, privacy:, ...)")
    return apply_overrides(config, overrides or [])


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
    """Build dataclass `cls` from `config[block]`, refusing keys it does not know."""
    values = config.get(block) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"config block '{block}' has unknown keys {unknown}; known keys: {', '.join(sorted(known))}"
        )
    return cls(**values)
