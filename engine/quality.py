"""The dataset quality report: the SA-1B paper's dataset figures for a store's annotation outputs.

One row per annotation stage and model round with finished shards: images and masks, masks per
image (and the SA-1B paper's bins), relative mask size (the square root of mask area over image
area, the paper's measure), predicted IoU and stability score, near-duplicate masks (another mask
of the same image with mask IoU >= `duplicate_iou`: what users of the peers complain about), masks
covering >= 95% of their image (the paper's filter drops them), and where mask centres fall on the
image (a 16 x 16 grid; SA-1B's are spread, object-centric datasets' are centred).

It reads one shard's annotation table at a time into fixed-size histograms, so memory does not
grow with the store; `every` reads every k-th finished shard (a sample of a large store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from engine import rle
from engine.checks import invalid
from engine.report_files import pyplot, save_png, text_table, write_report_files
from sharding.outputs import completed
from sharding.store import PRIVACY_STAGE, Store, check_stage

# (label, first, last) masks per image; last None: no upper end. 1-10 ... >200: the paper's bins.
PER_IMAGE_BINS = (("0", 0, 0), ("1-10", 1, 10), ("11-50", 11, 50), ("51-100", 51, 100),
                  ("101-200", 101, 200), (">200", 201, None))  # fmt: skip
# Relative mask size bins (sqrt(mask area / image area)), upper ends (each bin holds [lower, upper)).
SIZE_BINS = (0.05, 0.1, 0.25, 0.5, 1.0)
WHOLE_IMAGE = 0.95  # area fraction of the SA-1B filter (`amg.max_mask_area_fraction`)
FINE_BINS = 1000  # histogram bins over [0, 1]: percentiles to 0.001
GRID = 16  # mask-centre grid
CONCAVITY_BINS = (0.1, 0.25, 0.5, 1.0)  # upper ends (each bin holds [lower, upper))
# Predicted IoU and stability score bins: finer near SA-1B's thresholds (0.88 and 0.95), so a
# report shows how many masks sit just over them; values outside [0, 1] count in the end bins.
SCORE_BINS = (0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95, 0.97, 1.0)


@dataclass
class QualityConfig:
    """The `quality:` config block (`sa-engine quality`).

    stage, round: one annotation output (None: every stage and round with finished shards).
    duplicate_iou: two masks of one image with mask IoU >= this are near-duplicates (0: not
    counted, and the masks are not compared).
    every: read every k-th finished shard of an output (1: all).
    concavity_masks: masks per shard read, evenly spread, whose concavity is measured (it needs
    each mask decoded: ~5-10 ms at SA-1B's resolution); 0: none.
    ray: count the shards as Ray tasks (on ray.address / RAY_ADDRESS, else an embedded local
    Ray); cpus: CPUs one shard's task reserves.
    """

    stage: str | None = None
    round: int | None = None
    duplicate_iou: float = 0.9
    every: int = 1
    concavity_masks: int = 100
    ray: bool = False
    cpus: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.duplicate_iou, (int, float)) or not 0 <= self.duplicate_iou <= 1:
            raise invalid(
                "quality.duplicate_iou", self.duplicate_iou,
                "a mask IoU in [0, 1] (0: do not count near-duplicates)",
            )  # fmt: skip
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise invalid("quality.every", self.every, "a whole number >= 1")
        if not isinstance(self.concavity_masks, int) or self.concavity_masks < 0:
            raise invalid(
                "quality.concavity_masks", self.concavity_masks,
                "a whole number >= 0 (0: no concavity)",
            )  # fmt: skip
        if not self.cpus > 0:
            raise invalid("quality.cpus", self.cpus, "a value > 0")
        if self.round is not None and self.stage is None:
            raise ValueError("quality.round needs quality.stage: name the stage whose round to report")
        if self.stage is not None:
            check_stage(self.stage, self.round if self.round is not None else 0)


@dataclass
class QualityRow:
    """One annotation output's figures. Fractions are of images (masks-per-image bins) or of masks;
    a figure over no masks is None. Scores absent from a mask (people's masks) are left out of
    their figures."""

    stage: str
    round: int
    shards: int  # finished shards
    shards_read: int
    images: int
    masks: int
    masks_per_image: float
    masks_per_image_median: float | None
    masks_per_image_bins: dict[str, float]
    relative_size_p10: float | None
    relative_size_median: float | None
    relative_size_p90: float | None
    relative_size_bins: dict[str, float]
    predicted_iou_mean: float | None
    predicted_iou_p10: float | None
    predicted_iou_bins: dict[str, float]
    stability_mean: float | None
    stability_p10: float | None
    stability_bins: dict[str, float]
    near_duplicates: float | None  # masks with a near-duplicate / masks (None: not counted)
    near_duplicate_pairs: int | None
    whole_image: float | None  # masks covering >= 95% of their image / masks
    concavity_masks: int  # masks whose concavity was measured
    concavity_median: float | None
    concavity_p90: float | None
    concavity_bins: dict[str, float]
    centres: list[list[int]] = field(repr=False)  # GRID x GRID mask counts, top row first

    def cells(self) -> list[str]:
        def fmt(value: float | None, digits: int = 3) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f}%"

        return [
            self.stage,
            str(self.round),
            f"{self.shards_read}/{self.shards}",
            str(self.images),
            str(self.masks),
            fmt(self.masks_per_image, 1),
            fmt(self.masks_per_image_median, 1),
            fmt(self.relative_size_median),
            fmt(self.predicted_iou_p10),
            fmt(self.stability_p10),
            fmt(self.concavity_median),
            pct(self.near_duplicates),
            pct(self.whole_image),
        ]


HEADER = ["stage", "round", "shards", "images", "masks", "masks/image", "median", "rel. size p50",
          "pred. IoU p10", "stability p10", "concavity p50", "near-dup.", ">=95% image"]  # fmt: skip


class _Histogram:
    """Counts of values in FINE_BINS equal bins over [0, 1] (values outside go to the end bins),
    with their exact sum for the mean."""

    def __init__(self) -> None:
        self.counts = np.zeros(FINE_BINS, np.int64)
        self.total = 0.0

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        index = np.clip((values * FINE_BINS).astype(np.int64), 0, FINE_BINS - 1)
        self.counts += np.bincount(index, minlength=FINE_BINS)
        self.total += float(values.sum())

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bin holding the q-quantile (within 1 / FINE_BINS above it)."""
        if not self.n:
            return None
        at = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        return (min(at, FINE_BINS - 1) + 1) / FINE_BINS

    def shares(self, edges: tuple[float, ...]) -> dict[str, float]:
        """Bin label ("low-high") -> the fraction of the values in [low, high), for the bins that
        `edges` (their upper ends, the last 1.0) cut [0, 1] into; all 0 when there are no values."""
        cumulative = np.concatenate([[0], np.cumsum(self.counts)])
        ends = [int(cumulative[int(round(e * FINE_BINS))]) for e in edges]
        return {
            f"{low:g}-{high:g}": (end - start) / self.n if self.n else 0.0
            for low, high, start, end in zip((0.0,) + edges, edges, [0] + ends[:-1], ends)
        }


class Tally:
    """The figures of some shards of one annotation output, as sums: a shard's (`shard_tally`)
    add up (`merge`) in shard order to the output's, wherever each was counted."""

    def __init__(self, duplicate_iou: float, concavity_masks: int) -> None:
        self.duplicate_iou = duplicate_iou
        self.concavity_masks = concavity_masks
        self.concavity = _Histogram()
        self.per_image = np.zeros(0, np.int64)  # images by mask count
        self.size = _Histogram()
        self.iou = _Histogram()
        self.stability = _Histogram()
        self.masks = self.whole = self.with_duplicate = self.pairs = 0
        self.centres = np.zeros((GRID, GRID), np.int64)

    def merge(self, other: "Tally") -> None:
        if len(other.per_image) > len(self.per_image):
            self.per_image = np.pad(self.per_image, (0, len(other.per_image) - len(self.per_image)))
        self.per_image[: len(other.per_image)] += other.per_image
        for name in ("size", "iou", "stability", "concavity"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.counts += theirs.counts
            mine.total += theirs.total
        self.masks += other.masks
        self.whole += other.whole
        self.with_duplicate += other.with_duplicate
        self.pairs += other.pairs
        self.centres += other.centres

    def add_shard(self, images: list[int], table: Any) -> None:
        ids = table["image_id"].to_numpy()
        counts = np.zeros(len(images), np.int64)
        position = {image_id: i for i, image_id in enumerate(images)}
        seen, per = np.unique(ids, return_counts=True)
        for image_id, n in zip(seen.tolist(), per.tolist()):
            if image_id in position:
                counts[position[image_id]] = n
        tally = np.bincount(counts)
        if len(tally) > len(self.per_image):
            self.per_image = np.pad(self.per_image, (0, len(tally) - len(self.per_image)))
        self.per_image[: len(tally)] += tally
        if not len(ids):
            return
        self.masks += len(ids)
        size = table["rle_size"].combine_chunks().flatten().to_numpy().reshape(-1, 2).astype(np.float64)
        image_area = size[:, 0] * size[:, 1]
        fraction = table["area"].to_numpy().astype(np.float64) / image_area
        self.size.add(np.sqrt(fraction))
        self.whole += int((fraction >= WHOLE_IMAGE).sum())
        for name, histogram in (("predicted_iou", self.iou), ("stability_score", self.stability)):
            values = table[name].to_numpy(zero_copy_only=False)
            histogram.add(np.asarray(values, np.float64))  # None -> nan: left out
        box = table["bbox"].combine_chunks().flatten().to_numpy().reshape(-1, 4)
        cx = (box[:, 0] + box[:, 2] / 2) / size[:, 1]
        cy = (box[:, 1] + box[:, 3] / 2) / size[:, 0]
        cells = np.clip((np.stack([cy, cx], 1) * GRID).astype(np.int64), 0, GRID - 1)
        np.add.at(self.centres, (cells[:, 0], cells[:, 1]), 1)
        if self.duplicate_iou > 0:
            self._near_duplicates(ids, table)
        if self.concavity_masks:
            picked = np.unique(np.linspace(0, len(ids) - 1, min(len(ids), self.concavity_masks)).astype(int))
            rows = table.take(picked).select(["rle_size", "rle_counts"]).to_pylist()
            segmentations = [{"size": r["rle_size"], "counts": r["rle_counts"]} for r in rows]
            boxes = rle.bbox_xywh(segmentations)  # (the masks' own: a record's bbox is not trusted)
            self.concavity.add(
                np.array([concavity(rle.decode(m), b) for m, b in zip(segmentations, boxes)])
            )

    def _near_duplicates(self, ids: np.ndarray, table: Any) -> None:
        order = np.argsort(ids, kind="stable")
        starts = np.flatnonzero(np.diff(ids[order], prepend=-1))
        counts = table["rle_counts"].to_pylist()
        sizes = table["rle_size"].to_pylist()
        for group in np.split(order, starts[1:]):
            if len(group) < 2:
                continue
            matrix = rle.iou([{"size": sizes[i], "counts": counts[i]} for i in group.tolist()])
            close = matrix >= self.duplicate_iou
            np.fill_diagonal(close, False)
            self.with_duplicate += int(close.any(1).sum())
            self.pairs += int(np.triu(close, 1).sum())

    def row(self, stage: str, round_: int, shards: int, shards_read: int) -> QualityRow:
        images = int(self.per_image.sum())
        masks = self.masks

        def share(count: int, of: int) -> float | None:
            return count / of if of else None

        median = None
        if images:  # the middle value of the sorted counts (the mean of the two middle ones)
            cumulative = np.cumsum(self.per_image)
            middle = np.searchsorted(cumulative, [(images + 1) // 2, images // 2 + 1], side="left")
            median = float(middle.mean())
        bins = {}
        for label, first, last in PER_IMAGE_BINS:
            part = self.per_image[first : None if last is None else last + 1]
            bins[label] = share(int(part.sum()), images) or 0.0
        counted = self.duplicate_iou > 0
        return QualityRow(
            stage=stage,
            round=round_,
            shards=shards,
            shards_read=shards_read,
            images=images,
            masks=masks,
            masks_per_image=masks / images if images else 0.0,
            masks_per_image_median=median,
            masks_per_image_bins=bins,
            relative_size_p10=self.size.quantile(0.1),
            relative_size_median=self.size.quantile(0.5),
            relative_size_p90=self.size.quantile(0.9),
            relative_size_bins=self.size.shares(SIZE_BINS),
            predicted_iou_mean=self.iou.mean(),
            predicted_iou_p10=self.iou.quantile(0.1),
            predicted_iou_bins=self.iou.shares(SCORE_BINS),
            stability_mean=self.stability.mean(),
            stability_p10=self.stability.quantile(0.1),
            stability_bins=self.stability.shares(SCORE_BINS),
            near_duplicates=share(self.with_duplicate, masks) if counted else None,
            near_duplicate_pairs=self.pairs if counted else None,
            whole_image=share(self.whole, masks),
            concavity_masks=self.concavity.n,
            concavity_median=self.concavity.quantile(0.5),
            concavity_p90=self.concavity.quantile(0.9),
            concavity_bins=self.concavity.shares(CONCAVITY_BINS),
            centres=self.centres.tolist(),
        )


def concavity(mask: np.ndarray, bbox: list[float]) -> float:
    """1 - mask area / area of its convex hull, both in pixels (the SA-1B paper's measure; 0 for
    a convex mask, NaN for an empty one). `bbox`: the mask's XYWH box, where the work is done."""
    import cv2

    x, y, w, h = (int(round(v)) for v in bbox)
    window = np.ascontiguousarray(mask[y : y + h, x : x + w], np.uint8)
    area = int(window.sum())
    if not area:
        return float("nan")
    contours, _ = cv2.findContours(window, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = np.zeros_like(window)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.concatenate(contours)), 1)
    return 1.0 - area / max(int(np.count_nonzero(hull | window)), area)


class QualityCluster(Protocol):
    """Where `quality_rows` counts the shards (`stages.quality.RayQuality`: Ray tasks); None: here."""

    def shard_tallies(
        self, store: Store, stage: str, round_: int, shards: list[str], config: QualityConfig
    ) -> Iterator[Tally]:
        """`shard_tally(store, stage, round_, shard, config)` for every shard, in order."""
        ...


def shard_tally(
    store: Store,
    stage: str,
    round_: int,
    shard: str,
    config: QualityConfig,
    record: dict[str, Any] | None = None,
) -> Tally:
    """One finished shard's figures; `record`: its completion record, when the caller has just
    read it (a Ray task reads it again, on its node). Raises ValueError when its output is no
    longer finished."""
    record = record or store.done_record(stage, round_, shard, "size")
    if record is None:
        raise ValueError(
            f"{stage} round {round_} {shard} is no longer finished (its output changed while the "
            "report read it): run the report again"
        )
    tally = Tally(float(config.duplicate_iou), config.concavity_masks)
    tally.add_shard(list(record["images"]), store.read_annotations(stage, round_, shard))
    return tally


def quality_rows(
    store: Store, config: QualityConfig | None = None, cluster: QualityCluster | None = None
) -> list[QualityRow]:
    """One `QualityRow` per annotation output (stage, round) with finished shards, in stage and
    round order (or the one `config` names); each shard counted here, or on `cluster`. Raises
    ValueError when there is none."""
    config = config or QualityConfig()
    outputs = [
        (s, r) for s, r in store.stage_rounds()
        if s != PRIVACY_STAGE and (config.stage is None or s == config.stage)
        and (config.round is None or r == config.round)
    ]  # fmt: skip
    rows = []
    for stage, round_ in outputs:
        finished = list(completed(store, stage, round_, check="size").items())
        if not finished or not store.output_path(stage, round_, finished[0][0], "annotations").is_file():
            continue  # (an output of images alone)
        output = Tally(float(config.duplicate_iou), config.concavity_masks)
        sample = finished[:: config.every]
        if cluster is None:
            tallies = (shard_tally(store, stage, round_, s, config, record) for s, record in sample)
        else:
            tallies = cluster.shard_tallies(store, stage, round_, [s for s, _ in sample], config)
        for tally in tallies:
            output.merge(tally)
        rows.append(output.row(stage, round_, len(finished), len(sample)))
    if not rows:
        named = "" if config.stage is None else f" of {config.stage}" + (
            "" if config.round is None else f" round {config.round}"
        )
        raise ValueError(
            f"{store.root} has no finished annotation shards{named}: run a stage first "
            f"(`sa-engine run auto {store.root}`), or see `sa-engine status {store.root}`"
        )
    return rows


def format_table(rows: list[QualityRow]) -> str:
    return text_table(HEADER, [r.cells() for r in rows])


def write_report(rows: list[QualityRow], out: Path) -> list[Path]:
    """quality.json, quality.txt and quality.png into `out`. Returns the paths written."""
    return write_report_files(out, "quality", rows, format_table(rows), write_plot)


def write_plot(rows: list[QualityRow], path: Path) -> None:
    """Masks per image, relative mask size and concavity (the paper's measures), predicted IoU and
    stability; below, where each output's mask centres fall on the image (the first five)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 5, figsize=(27, 9))
    width = 0.8 / max(1, len(rows))
    for panel, key, title in (
        (axes[0, 0], "masks_per_image_bins", "images by masks per image"),
        (axes[0, 1], "relative_size_bins", "masks by sqrt(mask area / image area)"),
        (axes[0, 2], "concavity_bins", "masks by concavity (1 - area / convex hull)"),
        (axes[0, 3], "predicted_iou_bins", "masks by predicted IoU"),
        (axes[0, 4], "stability_bins", "masks by stability score"),
    ):
        labels = list(getattr(rows[0], key)) if rows else []
        for k, row in enumerate(rows):
            values = list(getattr(row, key).values())
            xs = np.arange(len(labels)) + (k - (len(rows) - 1) / 2) * width
            panel.bar(xs, values, width, label=f"{row.stage} r{row.round}")
        panel.set_xticks(np.arange(len(labels)), labels, rotation=45 if len(labels) > 6 else 0)
        panel.set_title(title)
        panel.set_ylabel("fraction")
        panel.legend(fontsize=8)
    for panel in axes[1, len(rows):]:
        panel.axis("off")
    for panel, row in zip(axes[1], rows):
        grid = np.asarray(row.centres, np.float64)
        panel.imshow(grid / max(grid.max(), 1), cmap="magma", extent=(0, 1, 1, 0))
        panel.set_title(f"mask centres: {row.stage} r{row.round}")
        panel.set_xlabel("x / width")
        panel.set_ylabel("y / height")
    fig.tight_layout()
    save_png(fig, path)
