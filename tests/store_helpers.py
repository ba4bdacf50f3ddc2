"""Real stand-in stages and synthetic photos for the shard-store tests (no model needed)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from engine.classical import classical_masks
from engine.references import ReferenceImage, ReferenceSet
from sharding.manifest import ingest
from sharding.runner import StageResult
from sharding.store import ImageRow, Store


def classical_stage(row: ImageRow, rgb: np.ndarray) -> StageResult:
    return StageResult(masks=classical_masks(rgb))


def blur_stage(row: ImageRow, rgb: np.ndarray) -> StageResult:
    """A whole-image Gaussian blur standing in for the privacy stage (the real one blurs faces)."""
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigmaX=8)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(blurred, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
    )
    return StageResult(image=buf.tobytes(), meta={"faces": 0, "plates": 0})


def synthetic_photos(
    folder: Path, count: int, size: tuple[int, int] = (160, 120), seed: int = 0
) -> list[Path]:
    """`count` distinct JPEGs with a few bright and dark blobs each (so the classical stage finds masks)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = size
        rgb = np.full((h, w, 3), 110, np.uint8)
        for _ in range(4):
            cx, cy, r = (
                int(rng.integers(10, w - 10)),
                int(rng.integers(10, h - 10)),
                int(rng.integers(8, 30)),
            )
            cv2.circle(rgb, (cx, cy), r, tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
        rgb[0, 0] = (i % 256, i // 256, 7)  # distinct bytes for every image
        path = folder / f"img_{i:03d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def person_photo_store(
    tmp_path: Path, refs: ReferenceSet, images: Path, count: int, max_people: int, shard_size: int = 2
) -> tuple[Store, list[ReferenceImage]]:
    """A store of the first `count` real photos of `refs` with 1..max_people reference persons
    (ingested from a list file, `shard_size` per shard); returns it and the chosen images."""
    chosen = [i for i in refs.images if 1 <= len(i.references) <= max_people][:count]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{images / i.file_name}\n" for i in chosen))
    store = Store.create(tmp_path / "store")
    ingest(str(listing), store, shard_size=shard_size)
    return store, chosen


def as_a_plain_user() -> list[str]:
    """A command prefix that runs without root's permission override (setpriv drops it), so
    that a folder of mode 000 or 555 means what it means to a user; [] when not root. Skips the
    calling test where the tests run as root without setpriv."""
    import os
    import shutil

    import pytest

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: folder permissions do not bind root")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", "--"]  # fmt: skip
