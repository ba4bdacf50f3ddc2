"""The effort report: per gear and model round, what annotating cost.

The SAM paper's evidence that the data engine works is effort falling as the model is retrained
(gear 1: 34 s -> 14 s per mask, 20 -> 44 masks per image). This module reads the annotation
tables of the annotation gears (`assisted`, `semi`) from the store and reduces them to those
figures, one row per (gear, round): images, masks per image, prefilled and added masks, clicks
per added mask, IoU at acceptance, seconds per added mask, masks given up. `write_plot` draws them
as a PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.gears import ASSISTED_STAGE, SEMI_STAGE
from engine.report_files import pyplot, save_png, text_table, write_report_files
from sharding.store import Store

GEARS = (ASSISTED_STAGE, SEMI_STAGE)
GEAR_NUMBER = {ASSISTED_STAGE: 1, SEMI_STAGE: 2}


@dataclass
class EffortRow:
    """One gear and model round. Means are over the added (annotator-made) masks; None when there
    are none (or, for iou, when no reference was known: people)."""

    gear: str
    round: int
    shards: int
    images: int
    masks: int
    prefilled: int
    added: int
    given_up: int
    masks_per_image: float
    clicks_per_mask: float | None
    iou_at_accept: float | None
    seconds_per_mask: float | None
    annotators: str

    def cells(self) -> list[str]:
        def fmt(v: float | None, digits: int = 2) -> str:
            return "-" if v is None else f"{v:.{digits}f}"

        return [
            f"{GEAR_NUMBER.get(self.gear, '?')} {self.gear}",
            str(self.round),
            str(self.images),
            str(self.masks),
            fmt(self.masks_per_image, 1),
            str(self.prefilled),
            str(self.added),
            str(self.given_up),
            fmt(self.clicks_per_mask),
            fmt(self.iou_at_accept, 3),
            fmt(self.seconds_per_mask, 1),
            self.annotators,
        ]


HEADER = [
    "gear",
    "round",
    "images",
    "masks",
    "masks/image",
    "prefilled",
    "added",
    "given up",
    "clicks/mask",
    "IoU at accept",
    "s/mask",
    "annotators",
]


def effort_rows(store: Store, gears: tuple[str, ...] = GEARS) -> list[EffortRow]:
    """One `EffortRow` per (gear, round) with at least one finished shard, in gear, round order."""
    rows = []
    for stage, round_ in store.stage_rounds():
        if stage not in gears:
            continue
        images = masks = prefilled = given_up = shards = 0
        clicks, ious, seconds, annotators = [], [], [], set()
        for shard in store.shards():
            record = store.done_record(stage, round_, shard)
            if record is None:
                continue
            shards += 1
            images += len(record["images"])
            given_up += int(record.get("meta", {}).get("given_up", 0))
            table = store.read_annotations(stage, round_, shard)
            for row in table.select(["clicks", "iou", "seconds", "prefilled", "annotator"]).to_pylist():
                masks += 1
                annotators.add(row["annotator"] or "unknown")
                if row["prefilled"]:
                    prefilled += 1
                    continue
                if row["clicks"] is not None:
                    clicks.append(row["clicks"])
                if row["iou"] is not None:
                    ious.append(row["iou"])
                if row["seconds"] is not None:
                    seconds.append(row["seconds"])
        if not shards:
            continue
        rows.append(
            EffortRow(
                gear=stage,
                round=round_,
                shards=shards,
                images=images,
                masks=masks,
                prefilled=prefilled,
                added=masks - prefilled,
                given_up=given_up,
                masks_per_image=masks / images if images else 0.0,
                clicks_per_mask=_mean(clicks),
                iou_at_accept=_mean(ious),
                seconds_per_mask=_mean(seconds),
                annotators="+".join(sorted(annotators)) or "-",
            )
        )
    order = {g: i for i, g in enumerate(gears)}
    return sorted(rows, key=lambda r: (order[r.gear], r.round))


def format_table(rows: list[EffortRow]) -> str:
    return text_table(HEADER, [r.cells() for r in rows])


def write_report(rows: list[EffortRow], out: Path) -> list[Path]:
    """effort.json, effort.txt and effort.png into `out`. Returns the paths written."""
    return write_report_files(out, "effort", rows, format_table(rows), write_plot)


def write_plot(rows: list[EffortRow], path: Path) -> None:
    """Four panels over model rounds, one line per gear (masks/image, clicks/mask, seconds/mask,
    IoU at accept), and a fifth with prefilled vs added masks per gear and round."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.2))
    panels = [
        ("masks per image", "masks_per_image"),
        ("clicks per added mask", "clicks_per_mask"),
        ("seconds per added mask", "seconds_per_mask"),
        ("IoU at acceptance", "iou_at_accept"),
    ]
    gears = sorted({r.gear for r in rows}, key=lambda g: GEAR_NUMBER.get(g, 9))
    for ax, (title, key) in zip(axes, panels):
        for gear in gears:
            points = [(r.round, getattr(r, key)) for r in rows if r.gear == gear]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=f"gear {GEAR_NUMBER.get(gear, '?')} ({gear})")
        ax.set_title(title)
        ax.set_ylim(*((0, 1.02) if key == "iou_at_accept" else (0, None)))
        ax.set_xlabel("model round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    ax = axes[4]
    labels = [f"g{GEAR_NUMBER.get(r.gear, '?')} r{r.round}" for r in rows]
    ax.bar(labels, [r.prefilled for r in rows], label="prefilled", color="#8c8")
    ax.bar(labels, [r.added for r in rows], bottom=[r.prefilled for r in rows], label="added")
    ax.set_title("masks: prefilled vs added")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=45)
    fig.suptitle("annotation effort per gear and model round" + ("" if rows else " (no data)"))
    fig.tight_layout()
    save_png(fig, path)


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None
