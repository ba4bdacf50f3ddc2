"""Segment Anything data engine: the library (model, predictor, mask generation, records, training).

Importable without Ray: the Ray pipelines live in `stages/` and import this package, never the reverse.
"""

__version__ = "0.1.0"
