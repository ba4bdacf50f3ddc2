"""OS file locks that go with their process: the store's ingest lock, and the shard leases of the
annotation tool's sessions.

A lock is `flock` on a small file that names its holder (pid, host, since when) for the message
the next process gets. The kernel drops it when the process ends, however it ends, so a killed
process leaves nothing to clean up. On a filesystem without file locks (some network mounts) a
take warns and goes on unlocked: the caller's work still runs, one at a time is then up to people.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import IO


class HeldLock:
    """A lock this process holds; `release` (or the process's end) gives it back."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.truncate(0)
            self._handle.close()  # closing the file drops the flock
            self._handle = None


def describe_this_process() -> str:
    """How a lock file names its holder: this process, its machine, and since when."""
    from sharding.store import utc_now

    return f"pid {os.getpid()} on {socket.gethostname()}, since {utc_now()}"


def take(path: Path, what: str, holder: str | None = None) -> HeldLock | None:
    """Take the lock at `path` (created if missing, with its folder), or None when another
    holder has it. `what` names the work in the warning given where the filesystem has no file
    locks; `holder` is what the file says of the holder (default: `describe_this_process()`)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        for attempt in range(10):  # (`holder` may hold it shared for a moment)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 9:
                    handle.close()
                    return None
                time.sleep(0.05)
    except OSError as exc:
        warnings.warn(f"{path}: no file locks here ({exc}); {what}")
    handle.seek(0)
    handle.truncate()
    handle.write(holder or describe_this_process())
    handle.flush()
    return HeldLock(handle)


def holder(path: Path) -> str | None:
    """Who holds the lock at `path` now (its holder's description), or None: nobody does (or
    there are no file locks here). Probes with a shared lock, released at once."""
    import fcntl

    try:
        handle = open(path)
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "a process that gave no details"
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
