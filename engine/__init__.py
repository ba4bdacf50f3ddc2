"""Segment Anything data engine: the library (model, predictor, mask generation, records, training).

Importable without Ray: the Ray pipelines live in `stages/` and import this package, never the reverse.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("sa-engine")  # pyproject.toml's, the one place it is written
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown"
