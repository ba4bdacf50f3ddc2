"""Shard store throughput: ingest, the shard runner against a bare loop, SA-1B export and verify.

Prints measured figures; run with `make bench` or `.venv/bin/python bench/bench_store.py [N]`.
Synthetic 1600x1200 JPEGs (so the 1500 px release resize really happens), shard size 50. The
ingest runs in this process (threads) and on an embedded local Ray (`ingest --ray`).
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.classical import classical_masks  # noqa: E402
from engine.quality import QualityConfig, quality_rows  # noqa: E402
from engine.image_io import load_image  # noqa: E402
from sharding.export_sa1b import export_sa1b  # noqa: E402
from sharding.manifest import ingest  # noqa: E402
from sharding.runner import StageResult, run_stage  # noqa: E402
from sharding.store import Store  # noqa: E402
from sharding.verify import verify_release  # noqa: E402


def _photos(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        rgb = cv2.resize(
            rng.integers(0, 255, (12, 16, 3), np.uint8), (1600, 1200), interpolation=cv2.INTER_CUBIC
        )
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
        (folder / f"p{i:05d}.jpg").write_bytes(buffer.getvalue())


def _blur(row, rgb):
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(cv2.GaussianBlur(rgb, (0, 0), 8), cv2.COLOR_RGB2BGR)
    )
    return StageResult(image=buf.tobytes())


def _ray_ingest(tmp: Path, count: int, local: Store) -> None:
    """The same ingest on an embedded local Ray (`ingest --ray`): its start, then the ingest
    (two passes over the files: scan, then shard writing), checked equal to the local one."""
    from stages.cluster import ray_session
    from stages.config import RayConfig
    from stages.ingest import RayIngest

    t = time.perf_counter()
    with ray_session(RayConfig()) as where:
        start = time.perf_counter() - t
        store = Store.create(tmp / "store-ray")
        t = time.perf_counter()
        ingest(str(tmp / "src"), store, shard_size=50, cluster=RayIngest())
        dt = time.perf_counter() - t
    same = all(
        store.manifest().equals(local.manifest()) and pq.read_table(store.shard_path(s)).equals(
            pq.read_table(local.shard_path(s)))
        for s in local.shards()
    )  # fmt: skip
    print(
        f"ingest on Ray ({where}; start {start:.1f} s): {dt:.2f} s, {count / dt:.1f} images/s, "
        f"tables {'identical to' if same else 'DIFFERENT from'} the local ingest's"
    )


def main(count: int = 100) -> None:
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _photos(tmp / "src", count)
        store = Store.create(tmp / "store")
        t = time.perf_counter()
        report = ingest(str(tmp / "src"), store, shard_size=50)
        dt = time.perf_counter() - t
        print(
            f"ingest {count} x 1600x1200 JPEG: {dt:.2f} s, {count / dt:.1f} images/s ({report.summary()})"
        )
        t = time.perf_counter()
        again = ingest(str(tmp / "src"), store, shard_size=50)
        print(f"re-ingest (no change): {time.perf_counter() - t:.2f} s, added {again.added}")
        _ray_ingest(tmp, count, store)

        rows = [row for shard in store.shards() for row in store.iter_shard(shard)]
        t = time.perf_counter()
        bare = sum(len(classical_masks(load_image(r.data))) for r in rows)
        bare_s = time.perf_counter() - t
        t = time.perf_counter()
        run = run_stage(
            store, "classical", 0, lambda row, rgb: StageResult(masks=classical_masks(rgb))
        )
        run_s = time.perf_counter() - t
        assert run.annotations == bare
        print(
            f"classical stage: bare loop {bare_s:.2f} s, shard runner {run_s:.2f} s "
            f"({run_s / bare_s:.2f}x; {run.annotations} masks, {count / run_s:.1f} images/s)"
        )
        t = time.perf_counter()
        (row,) = quality_rows(store, QualityConfig(stage="classical"))
        dt = time.perf_counter() - t
        print(
            f"quality report ({row.masks} masks, every image's masks compared for near-duplicates, "
            f"{row.concavity_masks} concavities): {dt:.2f} s, {row.masks / dt:.0f} masks/s, "
            f"{count / dt:.0f} images/s"
        )
        t = time.perf_counter()
        skip = run_stage(store, "classical", 0, lambda row, rgb: StageResult())
        print(
            f"resume with every shard done (checksums verified): {time.perf_counter() - t:.2f} s, "
            f"skipped {len(skip.skipped)} shards"
        )
        t = time.perf_counter()
        run_stage(store, "privacy", 0, _blur)
        print(f"blur stand-in stage: {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        rel = export_sa1b(store, tmp / "release")
        dt = time.perf_counter() - t
        print(
            f"export sa1b (resize to 1500, {rel.annotations} masks rescaled): {dt:.2f} s, {count / dt:.1f} images/s"
        )
        t = time.perf_counter()
        problems = verify_release(tmp / "release")
        size = sum(p.stat().st_size for p in (tmp / "release").glob("*.tar")) / 1e6
        print(
            f"verify {size:.0f} MB release: {time.perf_counter() - t:.2f} s, {len(problems)} problems"
        )
        t = time.perf_counter()
        again = export_sa1b(store, tmp / "release")
        print(
            f"re-export into the release (nothing changed): {time.perf_counter() - t:.2f} s, "
            f"{len(again.reused)}/{len(again.tars)} tars kept"
        )
        _ray_export(tmp, count, store)


def _ray_export(tmp: Path, count: int, store: Store) -> None:
    """The same SA-1B export on an embedded local Ray (`export sa1b --ray`, a task a tar),
    checked byte-identical to the one-process export's tars; then the quality report there (a
    task a shard), checked equal to the one-process report's."""
    from stages.cluster import ray_session
    from stages.config import RayConfig
    from stages.export import RayExport

    from stages.quality import RayQuality

    with ray_session(RayConfig()):
        t = time.perf_counter()
        report = export_sa1b(store, tmp / "release-ray", cluster=RayExport())
        dt = time.perf_counter() - t
        config = QualityConfig(stage="classical")
        t = time.perf_counter()
        rows = quality_rows(store, config, cluster=RayQuality())
        quality_s = time.perf_counter() - t
    same = all(
        (tmp / "release-ray" / name).read_bytes() == (tmp / "release" / name).read_bytes()
        for name in report.tars + ["MEMBERS.tsv", "SHA256SUMS"]
    )
    print(
        f"export sa1b on Ray ({len(report.tars)} tasks): {dt:.2f} s, {count / dt:.1f} images/s, "
        f"release {'identical to' if same else 'DIFFERENT from'} the one-process export's"
    )
    same = rows == quality_rows(store, config)
    print(
        f"quality report on Ray ({rows[0].shards_read} tasks): {quality_s:.2f} s, "
        f"{count / quality_s:.0f} images/s, figures {'identical to' if same else 'DIFFERENT from'} "
        "the one-process report's"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
