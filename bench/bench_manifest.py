"""What a run command's driver reads of the store before its first image, at dataset scale.

    python bench/bench_manifest.py                      # 2M images (make bench)
    python bench/bench_manifest.py --images 11000000    # SA-1B's 11M, shards of 1000

Writes (in a child process) a store whose manifest lists N images (synthetic rows: s3 URIs,
1500x1000, shards of `--shard-size`; no image files: none of this reads them) and times, in this
process, each piece of bookkeeping `sa-engine run STAGE STORE` does before Ray starts work: the
manifest's index columns, the shard list, the images per shard, the pending shards (a
completion-record lookup per shard), the embedded object store's size and the block size of the
shards to do; then the lookups export and the gears use (`shard_images`, `image_sizes`), and last
the whole manifest (the Parquet export). Prints seconds and this process's peak RSS after each.
Then, in a fresh process (its peak RSS its own), an ingest of the 4 demo photos into the store: its
dedupe against every stored image.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from sharding import tables  # noqa: E402
from sharding.manifest import ingest  # noqa: E402
from sharding.runner import pending_shards  # noqa: E402
from sharding.store import Store  # noqa: E402
from stages.config import RayConfig  # noqa: E402
from stages.steps import decoded_row_bytes, object_store_mb  # noqa: E402


def write_manifest(root: Path, images: int, shard_size: int) -> None:
    """A store whose manifest lists `images` synthetic images, in parts of 1M rows."""
    Store.create(root)
    (root / "manifest").mkdir(exist_ok=True)
    for part, start in enumerate(range(1, images + 1, 1_000_000)):
        ids = np.arange(start, min(images, start + 999_999) + 1)
        table = pa.table(
            {
                "image_id": ids,
                "source": pa.array([f"s3://bucket/sa1b/{i:09d}.jpg" for i in ids]),
                "bytes": np.full(len(ids), 400_000),
                "sha256": pa.array([f"{i:064x}" for i in ids]),
                "width": np.full(len(ids), 1500, np.int32),
                "height": np.full(len(ids), 1000, np.int32),
                "shard": pa.array([f"shard-{(i - 1) // shard_size:06d}" for i in ids]),
                "original_mode": pa.array(["RGB"] * len(ids)),
                "exif_rotated": np.zeros(len(ids), bool),
            },
            schema=tables.MANIFEST,
        )
        pq.write_table(table, root / "manifest" / f"part-{part:06d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2_000_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--ingest-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ingest_into:
        return ingest_demo_photos(args.ingest_into)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        writer = multiprocessing.get_context("fork").Process(
            target=write_manifest, args=(Path(tmp) / "store", args.images, args.shard_size)
        )
        writer.start()
        writer.join()
        if writer.exitcode:
            sys.exit(f"writing the synthetic manifest failed (exit {writer.exitcode})")
        store = Store(Path(tmp) / "store")
        print(f"{args.images} images, shards of {args.shard_size}: manifest written in "
              f"{time.perf_counter() - start:.1f} s (not timed below)")
        shards: list[str] = []
        ids_by_shard: list[list[int]] = []

        def sizes_by_shard() -> None:  # (as an export looks them up: one shard at a time)
            for ids in ids_by_shard:
                store.image_sizes(ids)

        steps = [
            ("manifest_index (read: runs)", store.manifest_index),
            ("shards", lambda: shards.extend(store.shards())),
            ("shard_sizes", store.shard_sizes),
            ("pending_shards (auto)", lambda: pending_shards(store, "auto", 0)),
            ("object_store_mb", lambda: object_store_mb(store, RayConfig())),
            ("decoded_row_bytes (shards to do)", lambda: decoded_row_bytes(store, shards)),
            ("shard_images (export, gears)", lambda: ids_by_shard.extend(store.shard_images().values())),
            ("image_sizes of each shard (export)", sizes_by_shard),
            ("manifest (read: parquet export)", store.manifest),
        ]
        for name, step in steps:
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"  {name:40s} {seconds:6.2f} s   peak RSS {peak:.2f} GiB", flush=True)
        subprocess.run([sys.executable, __file__, "--ingest-into", str(store.root)], check=True)


def ingest_demo_photos(root: Path) -> None:
    """An ingest of the 4 demo photos into the store at `root`, as `sa-engine ingest` runs it:
    a process of its own, so its peak RSS is the ingest's."""
    start = time.perf_counter()
    report = ingest(str(ROOT / "demo/photos"), Store(root))
    seconds = time.perf_counter() - start
    # (VmHWM: ru_maxrss would keep the forking parent's peak across the exec)
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
    peak = int(status.split()[0]) / 2**20
    name = f"ingest of demo/photos ({report.added} new, own process)"
    print(f"  {name:40s} {seconds:6.2f} s   peak RSS {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
