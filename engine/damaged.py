"""The error of a file the engine wrote that can no longer be read (a store's store.json or a
Parquet part cut short or overwritten): the message names the file and what to do, and every
command ends on it in one line (`engine.cli.main`), as on a permission error."""

from __future__ import annotations


class DamagedFile(ValueError):
    """A file of the engine's own that cannot be read; the message names it and the fix."""

    @classmethod
    def reading(cls, path: object, exc: BaseException, fix: str) -> "DamagedFile":
        """The error of `path`, whose reader raised `exc`; `fix`: what to do."""
        first = str(exc).splitlines()[0] if str(exc) else ""
        return cls(f"{path} is damaged ({type(exc).__name__}: {first}): {fix}")
