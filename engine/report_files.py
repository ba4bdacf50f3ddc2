"""What the store's reports (`engine.gears.effort`, `engine.quality`) share: a right-aligned text
table, and the three files `--out` writes (NAME.json, NAME.txt, NAME.png)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns right-aligned to their widest cell, a dashed line under the header."""
    cells = [header] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report_files(
    out: Path, name: str, rows: list[Any], table: str, plot: Callable[[list[Any], Path], None]
) -> list[Path]:
    """NAME.json (the rows, dataclasses), NAME.txt (`table`) and NAME.png (`plot(rows, path)`)
    into `out`, each atomically. Returns the paths written."""
    from engine.atomic import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{suffix}" for suffix in ("json", "txt", "png")]
    atomic_write_json(paths[0], [asdict(r) for r in rows], indent=1)
    atomic_write_bytes(paths[1], (table + "\n").encode())
    plot(rows, paths[2])
    return paths


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only: no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """Write a figure to `path` atomically and free it."""
    from engine.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    pyplot().close(fig)
