"""Check a release folder against its SHA256SUMS and MEMBERS.tsv; name every bad file."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from engine.provenance import sha256_file


def verify_release(out_dir: str | Path) -> list[str]:
    """Every problem in a release, one line each (empty list: the release is intact).

    Each tar is checked against SHA256SUMS, and each member of each tar against MEMBERS.tsv, so a
    corrupt tar names the members that are corrupt or missing, not only the tar.
    """
    out_dir = Path(out_dir)
    problems: list[str] = []
    sums_path, members_path = out_dir / "SHA256SUMS", out_dir / "MEMBERS.tsv"
    for path in (sums_path, members_path):
        if not path.is_file():
            return [f"{path}: missing (not a release folder written by `sa-engine export sa1b`)"]
    sums = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    expected: dict[str, dict[str, tuple[int, str]]] = {}
    for line in members_path.read_text().splitlines()[1:]:
        if line.strip():
            tar_name, member, size, digest = line.split("\t")
            expected.setdefault(tar_name, {})[member] = (int(size), digest)
    for path in sorted(out_dir.glob("*.tar")):
        if path.name not in sums and path.name not in expected:
            problems.append(f"{path.name}: not listed in SHA256SUMS or MEMBERS.tsv (stray file)")
    for tar_name in sorted(set(sums) | set(expected)):
        path = out_dir / tar_name
        if tar_name not in sums:
            problems.append(f"{tar_name}: not listed in SHA256SUMS")
        if not path.is_file():
            problems.append(f"{tar_name}: missing")
            problems += [f"{tar_name}/{m}: missing" for m in sorted(expected.get(tar_name, {}))]
            continue
        if tar_name in sums and sha256_file(path) != sums[tar_name]:
            problems.append(f"{tar_name}: checksum mismatch (corrupt or changed)")
        problems += _check_members(path, tar_name, expected.get(tar_name, {}))
    return problems


def _check_members(path: Path, tar_name: str, expected: dict[str, tuple[int, str]]) -> list[str]:
    problems, seen = [], set()
    try:
        with tarfile.open(path, "r") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError) as exc:
                    problems.append(f"{tar_name}: unreadable after {len(seen)} members ({exc})")
                    break
                if info is None:
                    break
                seen.add(info.name)
                if info.name not in expected:
                    problems.append(f"{tar_name}/{info.name}: not in MEMBERS.tsv")
                    continue
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, OSError, EOFError, AttributeError):
                    data = None
                size, digest = expected[info.name]
                if data is None or len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                    problems.append(f"{tar_name}/{info.name}: corrupt (size or sha256 differs)")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{tar_name}: not a readable tar ({exc})")
    problems += [f"{tar_name}/{m}: missing" for m in sorted(set(expected) - seen)]
    return problems
