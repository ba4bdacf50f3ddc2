"""What a run's outputs depend on: the installed packages' versions, from their metadata (no
import of torch or Ray; stored with every run record and printed by `sa-engine --version`), and
files' sha256 (the store's outputs, the weights a stage ran with)."""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("sa-engine", "torch", "ray", "pycocotools", "numpy", "pyarrow", "opencv-python-headless")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """{package: version} for the engine, the packages that decide its masks and files, and
    Python; a package that is not installed reads "not installed"."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read a MiB at a time (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
