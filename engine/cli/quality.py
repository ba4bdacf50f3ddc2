"""`sa-engine quality STORE`: the dataset quality report (`engine.quality`) of a store's
annotation outputs; every flag is a key of the config's `quality:` block."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.cli.common import (
    address_option,
    check_out_folder,
    config_option,
    fail,
    here_or_on_ray,
    open_store,
    ray_option,
    set_option,
)
from engine.cli.store import StoreArg

ConfigOpt = config_option("quality: and ray: blocks")
SetOpt = set_option("quality.every=10")
RayOpt = ray_option("quality", "count the shards")
AddressOpt = address_option("count")


def quality(
    store: StoreArg,
    stage: Annotated[
        Optional[str], typer.Option(help="quality.stage: only this annotation stage (default: every one)")
    ] = None,
    round_: Annotated[
        Optional[int], typer.Option("--round", help="quality.round: only this model round of --stage")
    ] = None,
    duplicate_iou: Annotated[
        Optional[float],
        typer.Option(help="quality.duplicate_iou: mask IoU at which two masks of an image are near-duplicates (0: off)"),
    ] = None,
    every: Annotated[
        Optional[int], typer.Option(help="quality.every: read every k-th finished shard (a sample)")
    ] = None,
    concavity_masks: Annotated[
        Optional[int],
        typer.Option(help="quality.concavity_masks: masks per shard whose concavity is measured (0: none)"),
    ] = None,
    ray: RayOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = "sa1b",
    set_: SetOpt = None,
    out: Annotated[
        Optional[Path], typer.Option(help="also write quality.json, quality.txt and quality.png here")
    ] = None,
) -> None:
    """Dataset figures per annotation stage and round, as the SA-1B paper reports them.

    Masks per image, relative mask size, concavity, predicted IoU and stability, near-duplicate
    masks, masks covering the whole image, and (with --out) where mask centres fall.
    """
    from engine.cli.config import flag_overrides, load_config, section
    from engine.quality import QualityConfig, format_table, quality_rows, write_report

    from stages.config import RayConfig

    if out is not None:
        check_out_folder(out, "the quality report")
    flags = {"stage": stage, "round": round_, "duplicate_iou": duplicate_iou, "every": every,
             "concavity_masks": concavity_masks, "ray": ray}  # fmt: skip
    try:
        cfg = load_config(config, list(set_ or []) + flag_overrides("quality", flags, address))
        quality_cfg = section(cfg, "quality", QualityConfig)
        ray_cfg = section(cfg, "ray", RayConfig)
        target = open_store(store)

        def ray_quality():
            from stages.quality import RayQuality

            return RayQuality(quality_cfg.cpus)

        rows = here_or_on_ray(
            quality_cfg.ray, ray_cfg, "quality report",
            lambda cluster: quality_rows(target, quality_cfg, cluster=cluster), ray_quality,
        )  # fmt: skip
    except ValueError as err:
        fail(str(err))
    typer.echo(format_table(rows))
    if out is not None:
        for path in write_report(rows, out):
            typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command(name="quality")(quality)
