"""The per-stage progress bar: shards, images and masks per second, on stderr; and the ingest's
and the export's."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One line per stage: rewritten in place on a terminal, one line per committed shard
    otherwise (logs, CI)."""

    def __init__(
        self, label: str, shards: int, images: int, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.label, self.shards_total, self.images_total = label, shards, images
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shards = self.images = self.masks = self.quarantined = 0
        self.t0 = time.perf_counter()
        self._shown = 0.0

    def add_image(self, masks: int, quarantined: bool) -> None:
        self.images += 1
        self.masks += masks
        self.quarantined += int(quarantined)
        if self.tty and time.perf_counter() - self._shown > 0.25:
            self._show()

    def add_shard(self, images: int = 0, masks: int = 0) -> None:
        """A shard done (with `images` and `masks` not yet counted image by image)."""
        self.shards += 1
        self.images += images
        self.masks += masks
        self._show(newline=not self.tty)

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return (
            f"{self.label}: shards {self.shards}/{self.shards_total} | images "
            f"{self.images}/{self.images_total} | {self.masks} masks | {self.masks / dt:.1f} masks/s"
            f" | {self.images / dt:.2f} images/s | quarantined {self.quarantined}"
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            self._show()
            self.stream.write("\n")
            self.stream.flush()

    def _show(self, newline: bool = False) -> None:
        if not self.enabled:
            return
        self._shown = time.perf_counter()
        self.stream.write(("\r" if self.tty else "") + self.line() + ("\n" if newline else ""))
        self.stream.flush()


class ExportProgress(Progress):
    """The SA-1B export's line: tars done of those to write (kept ones included), images and
    masks released; one line per tar in a log."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        super().__init__("export sa1b", 0, 0, enabled, stream)

    def update(self, done: dict | None, total: int) -> None:
        """`sharding.export_sa1b.export_sa1b`'s `on_shard`."""
        self.shards_total = total
        self.add_shard(*((done["images"], done["annotations"]) if done else (0, 0)))

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return (
            f"{self.label}: tars {self.shards}/{self.shards_total} | images {self.images} | "
            f"{self.masks} masks | {self.images / dt:.1f} images/s"
        )


class IngestProgress(Progress):
    """The ingest's line: files read of those to read, what became of them, files per second;
    in place on a terminal, else one line per `every` files (an 11M-file ingest runs for hours)."""

    def __init__(
        self, enabled: bool = True, stream: TextIO | None = None, every: int = 10000
    ) -> None:
        super().__init__("ingest", 0, 0, enabled, stream)
        self.every = every
        self.report = None

    def update(self, done: int, total: int, report) -> None:
        """`sharding.manifest.ingest`'s `on_file` (`report`: its counts so far)."""
        self.images, self.images_total, self.report = done, total, report
        if self.tty:
            if time.perf_counter() - self._shown > 0.25:
                self._show()
        elif done and (done % self.every == 0 or done == total):
            self._show(newline=True)

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        r = self.report
        counts = "" if r is None else (
            f" | added {r.added} | unchanged {r.unchanged} | duplicates {r.duplicates} | "
            f"quarantined {r.quarantined}"
        )  # fmt: skip
        rate = self.images / dt
        return f"{self.label}: files {self.images}/{self.images_total}{counts} | {rate:.1f} files/s"
