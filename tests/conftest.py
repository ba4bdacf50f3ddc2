"""Shared fixtures. `../shared` (parity fixtures, real photos) is read in place and never copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
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


@pytest.fixture(scope="module")
def local_ray():
    """An embedded local Ray for one test module, as `sa-engine run` starts it (127.0.0.1 only,
    no token auth, 2 logical CPUs); the repository and tests/ are importable by its workers. The
    CLI's stage commands run on it when invoked in-process (`ray_session` joins it)."""
    from stages.cluster import LOOPBACK_ENV, ray_session
    from stages.config import RayConfig

    env = {
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    saved = {k: os.environ.get(k) for k in (*env, "RAY_ADDRESS")}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)  # always the embedded Ray, never a cluster
    import ray

    try:
        with ray_session(RayConfig(num_cpus=2)):  # the command's own embedded Ray
            yield ray
    finally:
        os.environ.pop(LOOPBACK_ENV, None)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
