"""Shared fixtures. `../shared` (parity fixtures, real photos) is read in place and never copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: set SA_ENGINE_SHARED or place shared/ beside the repo")
    return SHARED


@pytest.fixture(scope="session")
def parity_dir(shared_dir) -> Path:
    path = shared_dir / "fixtures" / "sam_parity"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the SAM parity fixtures are needed for this test")
    return path


@pytest.fixture(scope="session")
def shared_data_dir(shared_dir) -> Path:
    path = shared_dir / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the real evaluation photos are needed for this test")
    return path


@pytest.fixture(scope="session")
def demo_photos() -> list[Path]:
    return sorted((ROOT / "demo" / "photos").glob("*.jpg"))
