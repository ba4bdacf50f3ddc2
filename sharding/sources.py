"""Where images come from: a folder (recursive), a glob, a list file, or one file, on any fsspec
filesystem (local paths, `file://`, `memory://`, `s3://` ...) through one code path.

Every input is named by its full URI (`fs.unstrip_protocol`), so `/data/a.jpg` and
`file:///data/a.jpg` are the same source, and sources sort the same way on every run.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import fsspec
import numpy as np
from fsspec import AbstractFileSystem

from engine.image_io import IMAGE_SUFFIXES

LIST_EXTENSIONS = (".txt", ".lst", ".list")
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class SourceListing:
    """The image files a SOURCE names, sorted by URI, and the files a folder held that were not
    images by extension (reported, not quarantined: a folder's README is not a broken photo)."""

    uris: list[str]
    ignored: list[str]
    sizes: list[int] | None = None  # bytes of each of `uris`, where asked for and listed
    # folders that could not be listed (permission denied, an I/O error), with the error: their
    # files are not in `uris`, and ingest quarantines each folder so that it is not lost silently
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def list_source(source: str, with_sizes: bool = False) -> SourceListing:
    """Resolve SOURCE to a sorted list of file URIs.

    Arguments:
      source (str): a folder (walked recursively, image extensions only), a glob (`dir/**/*.jpg`),
        a list file (`.txt`/`.lst`/`.list`: one path or URI per line, `#` comments, relative
        paths resolved against the list file's folder), or a single image file. Any of them as a
        local path or an fsspec URI.
      with_sizes (bool): also keep each file's size from a folder's or a glob's listing (an
        object store lists them with the names: no request per file).
    Returns:
      (SourceListing): URIs sorted as strings, duplicates removed.
    Raises:
      ValueError: the source does not exist or names nothing.
    """
    fs, path = _url_to_fs(source)
    sizes: dict[str, int] | None = None
    unreadable: list[tuple[str, str]] = []
    # a path that exists is taken as it is: a folder "sets [2023]" or a file "img[1].jpg" (as a
    # glob, the first matched nothing and the second matched img1.jpg)
    if any(ch in path for ch in _GLOB_CHARS) and not fs.exists(path):
        found = fs.glob(path, detail=True)  # (types come with the names: no call per file)
        files = {p: info for p, info in found.items() if info.get("type") == "file"}
        uris = [fs.unstrip_protocol(p) for p in files]
        ignored: list[str] = []
        if with_sizes:
            sizes = {fs.unstrip_protocol(p): int(info["size"]) for p, info in files.items()}
    elif fs.isdir(path):
        uris, ignored = [], []
        sizes = {} if with_sizes else None
        # a folder at a time (walk): the details of one folder's files, never of all of them
        for folder, files in _walk_following_links(fs, path, with_sizes, unreadable):
            for name in files:
                if name.startswith("."):
                    continue
                uri = fs.unstrip_protocol(f"{folder.rstrip('/')}/{name}")
                (uris if name.lower().endswith(IMAGE_SUFFIXES) else ignored).append(uri)
                if sizes is not None:
                    sizes[uri] = int(files[name]["size"])
    elif fs.isfile(path):
        if path.lower().endswith(LIST_EXTENSIONS):
            uris, ignored = _read_list(fs, path), []
        else:
            uris, ignored = [fs.unstrip_protocol(path)], []
    else:
        raise ValueError(
            f"source '{source}' does not exist: pass a folder, a glob, a list file (.txt) or a URI"
        )
    if not uris and unreadable:
        raise ValueError(
            f"source '{source}': folder {unreadable[0][0]} cannot be listed ({unreadable[0][1]}): "
            "make it readable for this user"
        )
    if not uris:
        raise ValueError(
            f"source '{source}' names no image files ({', '.join(IMAGE_SUFFIXES)}): "
            "check the path or pass a glob"
        )
    uris.sort()  # in place, then repeats dropped in place: no set and no second list of the URIs
    _drop_repeats(uris)
    sized = None if sizes is None else [sizes[u] for u in uris]
    return SourceListing(uris, sorted(ignored), sized, sorted(unreadable))


def _walk_following_links(
    fs: AbstractFileSystem, path: str, detail: bool, unreadable: list[tuple[str, str]]
):
    """(folder, its files) for `path` and every folder under it, also under symbolic links to
    folders, which fsspec's local filesystem lists as files: a linked folder of photos is part of
    the source, as `ls -R` and the `amg` command see it. Each real folder is listed once (a link
    to a folder above it would loop); hidden folders are left out, as hidden files are. A folder
    that cannot be listed goes to `unreadable` (URI, error). One `ls` per folder, as `fs.walk`
    does, but walked here: fsspec's walk reports a folder it cannot list only at the top."""
    import os

    def cannot_list(exc: OSError) -> None:
        error = f"{type(exc).__name__}: {exc.strerror or exc}"
        unreadable.append((fs.unstrip_protocol(str(exc.filename or root)), error))

    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    roots, seen = [path], set()
    while roots:
        root = roots.pop()
        real = os.path.realpath(root) if local else root
        if real in seen:
            continue
        seen.add(real)
        for folder, dirs, files in fs.walk(root, maxdepth=1, detail=True, on_error=cannot_list):
            roots.extend(f"{folder.rstrip('/')}/{d}" for d in dirs if not d.startswith("."))
            if local:  # only names that are no image are looked at: no stat per photo
                linked = [n for n in files if not n.lower().endswith(IMAGE_SUFFIXES)
                          and not n.startswith(".")
                          and os.path.isdir(f"{folder.rstrip('/')}/{n}")]  # fmt: skip
                roots.extend(f"{folder.rstrip('/')}/{n}" for n in linked)
                files = {n: files[n] for n in files if n not in linked}
            yield folder, files if detail else list(files)


def _drop_repeats(items: list[str]) -> None:
    """Remove the repeats of a sorted list, in place."""
    kept = 0
    for item in items:
        if not kept or item != items[kept - 1]:
            items[kept] = item
            kept += 1
    del items[kept:]


def read_source(uri: str) -> bytes:
    """The bytes of one source URI (raises OSError/FileNotFoundError as the filesystem does)."""
    with fsspec.open(uri, "rb") as handle:
        return handle.read()


def source_size(uri: str) -> int | None:
    """The size of one source URI in bytes, None when it cannot be had (the read will say why)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return int(fs.size(path))
    except (OSError, ValueError, TypeError):
        return None


# Known files of one folder from which `current_sizes` lists the folder instead of asking each.
FOLDER_LISTING_MIN = 64


def current_sizes(uris: list[str], rows: np.ndarray) -> np.ndarray:
    """The sizes now, in bytes, of `uris[rows]` (-1: gone or unknown), for `--skip-known` over a
    list file, whose lines bring no sizes. A folder holding at least FOLDER_LISTING_MIN of them
    is listed once (an object store answers a thousand names with their sizes a request) instead
    of asked a file at a time (a request each: days for SA-1B's 11M on S3); a file its folder's
    listing lacks reads -1, so it is read again, never wrongly skipped. `uris` is sorted: a
    folder's files come together (those after a sub-folder's make a second group)."""
    out = np.full(len(rows), -1, np.int64)
    start = 0
    while start < len(rows):
        folder = uris[rows[start]].rsplit("/", 1)[0]
        end = start + 1
        while end < len(rows) and uris[rows[end]].rsplit("/", 1)[0] == folder:
            end += 1
        listed = _folder_sizes(folder) if end - start >= FOLDER_LISTING_MIN else None
        for k in range(start, end):
            uri = uris[rows[k]]
            size = source_size(uri) if listed is None else listed.get(uri)
            out[k] = -1 if size is None else size
        start = end
    return out


def _folder_sizes(folder: str) -> dict[str, int] | None:
    """{URI: bytes} of a folder's files from one listing; None if it cannot be listed."""
    try:
        fs, path = fsspec.core.url_to_fs(folder)
        entries = fs.ls(path, detail=True)
    except (OSError, ValueError):
        return None
    return {
        fs.unstrip_protocol(entry["name"]): int(entry["size"])
        for entry in entries
        if entry.get("type") == "file" and entry.get("size") is not None
    }


def _url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """fsspec's `url_to_fs`, with a file:// URI's percent-escapes decoded as RFC 8089 reads
    them (`file:///data/my%20photos` is the folder "my photos", as file managers copy it);
    plain paths are taken as written."""
    from urllib.parse import unquote

    fs, path = fsspec.core.url_to_fs(url)
    if url.startswith("file://") and "%" in path:
        path = unquote(path)
    return fs, path


def _read_list(fs: AbstractFileSystem, path: str) -> list[str]:
    base = path.rsplit("/", 1)[0] if "/" in path else ""
    uris = []
    try:
        with fs.open(path, "rt", encoding="utf-8-sig") as handle:  # a line at a time, not all at once
            for line in handle:
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                if "://" in entry:
                    entry_fs, entry_path = _url_to_fs(entry)
                    uris.append(entry_fs.unstrip_protocol(entry_path))
                else:  # ("./a.jpg" and "a.jpg" are one file: one source, not a duplicate)
                    joined = entry if entry.startswith("/") or not base else f"{base}/{entry}"
                    uris.append(fs.unstrip_protocol(posixpath.normpath(joined)))
    except UnicodeDecodeError as err:
        raise ValueError(
            f"list file {fs.unstrip_protocol(path)} is not UTF-8 text ({err.reason} at byte "
            f"{err.start} of a chunk): save it as UTF-8, one path or URI per line"
        ) from None
    return uris
