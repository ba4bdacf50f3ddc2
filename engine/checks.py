"""The one form of a config value's error, for every block's dataclass:
`train.lr=-1 is invalid: use a value > 0`: the key as a user writes it in YAML or `--set`, the
value they gave, and what it takes."""

from __future__ import annotations

from typing import Any


def invalid(key: str, value: Any, use: str) -> ValueError:
    """The error for `key` (block.key) set to `value`; `use`: what the key takes."""
    return ValueError(f"{key}={value!r} is invalid: use {use}")
