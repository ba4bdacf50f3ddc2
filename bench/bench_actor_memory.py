"""A model actor's memory against the image count, without Ray: is the engine's part flat?

    python bench/bench_actor_memory.py --images 200 --photos 20

Runs the automatic gear's `stages.steps.ModelActor` as a Ray model actor runs it (on a thread
other than the main one, batches of `--block` decoded images from the store's shards, torch on
one thread), but in this process, with no Ray: the same per-image work, the same pickled
outcomes and the same `release_freed_memory` after each image. Prints this process's resident
memory (VmRSS) and its high-water mark (VmHWM) every `--every` images. Where the actor's memory
in a Ray run (`bench/bench_ray.py --breakdown`) grows and this does not, the growth is Ray's part
of the worker, not the engine's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def memory_gib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, GiB."""
    from bench_ray import status_kib

    return status_kib("self", "VmRSS") / 2**20, status_kib("self", "VmHWM") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--photos", type=int, default=20, help="distinct photos cycled (0: all)")
    parser.add_argument("--block", type=int, default=4, help="images a batch (ray.block_images)")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--points-per-side", type=int, default=4)
    parser.add_argument("--short-side", type=int, default=320)
    args = parser.parse_args()

    import bench_ray
    from sharding.manifest import ingest
    from sharding.store import Store
    from stages.steps import ModelActor, decode, read_shard

    tmp = Path(tempfile.mkdtemp(prefix="bench_actor_memory"))
    bench_ray.make_folder(tmp / "photos", args.images, args.short_side, args.photos)
    store = Store.create(str(tmp / "store"))
    ingest(str(tmp / "photos"), store, shard_size=10)
    options = types.SimpleNamespace(stage="auto", points_per_side=args.points_per_side)
    _, spec, _ = bench_ray.stage_parts(options)
    print(f"{args.images} images ({args.photos or 'all'} distinct photos cycled), blocks of {args.block}")
    print(f"{'images':>6} {'RSS GiB':>8} {'HWM GiB':>8}")

    def work() -> None:
        actor = ModelActor(spec, threads=1)
        done = 0
        for shard in store.shards():
            item = {"shard": shard, "skip": "[]"}
            rows = [
                decode(row, store.max_pixels, store.min_side)
                for row in read_shard(item, str(tmp / "store"))
            ]
            for start in range(0, len(rows), args.block):
                part = rows[start : start + args.block]
                batch = {}
                for key in part[0]:
                    column = np.empty(len(part), dtype=object)  # (images stay one object each)
                    for i, row in enumerate(part):
                        column[i] = row[key]
                    batch[key] = column
                actor(batch)
                before, done = done, done + len(part)
                if done // args.every > before // args.every or done == args.images:
                    rss, hwm = memory_gib()
                    print(f"{done:>6} {rss:>8.3f} {hwm:>8.3f}", flush=True)

    thread = threading.Thread(target=work)  # a Ray actor's calls run off the main thread
    thread.start()
    thread.join()


if __name__ == "__main__":
    main()
