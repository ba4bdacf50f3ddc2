"""The versions a run's outputs depend on, from the installed packages' metadata (no import of
torch or Ray): stored with every run record and printed by `sa-engine --version`."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

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
