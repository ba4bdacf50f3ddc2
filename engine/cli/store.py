"""`ingest`, `status`, `export {sa1b,coco,parquet}` and `verify`: the shard store from the shell."""

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

StoreArg = Annotated[Path, typer.Argument(help="the store folder (made by `ingest`)")]
StageOpt = Annotated[
    Optional[str], typer.Option(help="export.stage: annotation stage to export (default: latest completed)")
]
RoundOpt = Annotated[
    Optional[int], typer.Option("--round", help="export.round: model round of --stage (default: its latest)")
]
IngestConfigOpt = config_option("ingest: and ray: blocks")
IngestSetOpt = set_option("ingest.threads=16")
ExportConfigOpt = config_option("export: and ray: blocks")
ExportSetOpt = set_option("export.short_side=1500")
TablesConfigOpt = config_option("export: block (stage, round; short_side for coco)")
IngestRayOpt = ray_option(
    "ingest", "read, hash, validate and write shards", "threads in this process"
)
IngestAddressOpt = address_option("ingest")
ExportRayOpt = ray_option("export", "write the tars, a shard each,")
ExportAddressOpt = address_option("export")


def ingest(
    source: Annotated[
        str,
        typer.Argument(help="folder, glob, list file (.txt) or URI (file://, s3://, memory://)"),
    ],
    store: Annotated[
        Path, typer.Option(help="store folder (created if new; on a cluster: shared storage)")
    ],
    config: IngestConfigOpt = "sa1b",
    set_: IngestSetOpt = None,
    shard_size: Annotated[
        Optional[int], typer.Option(help="ingest.shard_size: images per new shard")
    ] = None,
    skip_known: Annotated[
        Optional[bool],
        typer.Option(
            "--skip-known/--read-all",
            help="ingest.skip_known: don't read files the store holds under the same URI with the "
            "same size (a re-ingest of a source that only grew; a file rewritten in place at the "
            "same size is missed); --read-all (default): read and hash every file, content decides",
        ),
    ] = None,
    threads: Annotated[
        Optional[int],
        typer.Option(
            help="ingest.threads: files read, hashed and decoded at once here (default: one per "
            "CPU, at most 8)"
        ),
    ] = None,
    commit_shards: Annotated[
        Optional[int],
        typer.Option(
            help="ingest.commit_shards: commit every N new shards, so a stopped ingest re-run "
            "goes on from its last commit (--set ingest.commit_shards=null: once, at the end)"
        ),
    ] = None,
    ray: IngestRayOpt = None,
    address: IngestAddressOpt = None,
) -> None:
    """Validate, deduplicate and cut SOURCE's new images into new shards of STORE (ids never change)."""
    from engine.cli.config import flag_overrides, load_config, section
    from sharding.manifest import IngestConfig
    from sharding.manifest import ingest as run_ingest
    from sharding.store import Store
    from stages.config import RayConfig

    flags = {"shard_size": shard_size, "skip_known": skip_known, "threads": threads,
             "commit_shards": commit_shards, "ray": ray}  # fmt: skip
    try:
        cfg = load_config(config, list(set_ or []) + flag_overrides("ingest", flags, address))
        ingest_cfg = section(cfg, "ingest", IngestConfig)
        ray_cfg = section(cfg, "ray", RayConfig)
    except ValueError as err:
        fail(str(err))
    from stages.progress import IngestProgress

    progress = IngestProgress(enabled=ingest_cfg.progress)
    kwargs = dict(
        shard_size=ingest_cfg.shard_size, skip_known=ingest_cfg.skip_known,
        threads=ingest_cfg.threads, commit_shards=ingest_cfg.commit_shards,
        on_file=progress.update,
    )  # fmt: skip
    def ray_ingest():
        from stages.ingest import RayIngest

        return RayIngest(ingest_cfg.chunk, ingest_cfg.cpus)

    try:
        target = Store.create(store)
        report = here_or_on_ray(
            ingest_cfg.ray, ray_cfg, "ingest",
            lambda cluster: run_ingest(source, target, cluster=cluster, **kwargs), ray_ingest,
        )  # fmt: skip
    except (ValueError, RuntimeError) as err:
        progress.close()
        fail(str(err))
    progress.close()
    typer.echo(report.summary())
    if report.quarantined:
        typer.echo(
            f"quarantined inputs and reasons: `sa-engine status {store}` (table: {store}/quarantine/)"
        )


def status(
    store: StoreArg,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--quick",
            help="--verify: re-hash every output against its recorded sha256 and set aside the "
            "records of files that fail, for the next run to redo (reads the whole store: hours "
            "at SA-1B's scale); --quick (default): output sizes only, as runs check them",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="print one JSON object instead (per stage and round: shards done / total, "
            "complete, images, annotations, quarantined; the ingest running or stopped)",
        ),
    ] = False,
    quarantine: Annotated[
        bool,
        typer.Option(
            "--quarantine",
            help="list every quarantined input (where it was skipped, source, reason, detail, "
            "sha256); without it the first 10 are listed (also in --json)",
        ),
    ] = False,
) -> None:
    """Progress per stage and round: shards done/total, images, annotations, quarantined.

    With --verify it also reads every shard file's footer, and exits 1 while any shard is set
    aside (an output failed its sha256 check; `run` redoes it) or a shard file is damaged.
    """
    import json

    from sharding.status import LISTED_QUARANTINE, format_status, store_status

    data = store_status(open_store(store), "sha256" if verify else "size")
    listed = None if quarantine else LISTED_QUARANTINE
    if as_json:
        typer.echo(json.dumps({**data, "quarantine": data["quarantine"][:listed]}, indent=1))
    else:
        for line in format_status(data, listed):
            typer.echo(line)
    if verify and (any(p["set_aside"] for p in data["stages"]) or data["damaged_shards"]):
        raise typer.Exit(code=1)


export_app = typer.Typer(
    help="Export one annotation output: SA-1B tar shards, COCO JSON or Parquet tables.",
    no_args_is_help=True,
)


@export_app.command("sa1b")
def export_sa1b(
    store: StoreArg,
    out: Annotated[
        Path, typer.Option(help="release folder (new, a previous release, or a stopped export's)")
    ],
    config: ExportConfigOpt = "sa1b",
    set_: ExportSetOpt = None,
    stage: StageOpt = None,
    round_: RoundOpt = None,
    privacy_round: Annotated[
        Optional[int], typer.Option(help="export.privacy_round: privacy output round (default: latest)")
    ] = None,
    short_side: Annotated[
        Optional[int],
        typer.Option(help="export.short_side: release frame's shortest side in px (0: the store frame)"),
    ] = None,
    allow_partial: Annotated[
        Optional[bool],
        typer.Option(
            "--allow-partial/--whole",
            help="export.allow_partial: skip shards without privacy output instead of refusing",
        ),
    ] = None,
    ray: ExportRayOpt = None,
    address: ExportAddressOpt = None,
) -> None:
    """SA-1B tars of blurred `sa_<id>.jpg` + `sa_<id>.json`, SHA256SUMS and MEMBERS.tsv.

    A stopped export run again into the same folder keeps the tars it wrote.
    """
    from engine.cli.config import flag_overrides, load_config, section
    from sharding.export_sa1b import ExportConfig
    from sharding.export_sa1b import export_sa1b as run_export
    from stages.config import RayConfig

    check_out_folder(out, "the release")
    flags = {"stage": stage, "round": round_, "privacy_round": privacy_round,
             "short_side": short_side, "allow_partial": allow_partial, "ray": ray}  # fmt: skip
    try:
        cfg = load_config(config, list(set_ or []) + flag_overrides("export", flags, address))
        export_cfg = section(cfg, "export", ExportConfig)
        ray_cfg = section(cfg, "ray", RayConfig)
    except ValueError as err:
        fail(str(err))
    from stages.progress import ExportProgress

    target = open_store(store)
    progress = ExportProgress(enabled=export_cfg.progress)
    kwargs = dict(
        stage=export_cfg.stage, round_=export_cfg.round, privacy_round=export_cfg.privacy_round,
        short_side=export_cfg.short_side, allow_partial=export_cfg.allow_partial,
        on_shard=progress.update,
    )  # fmt: skip
    def ray_export():
        from stages.export import RayExport

        return RayExport(export_cfg.cpus)

    try:
        report = here_or_on_ray(
            export_cfg.ray, ray_cfg, "export",
            lambda cluster: run_export(target, out, cluster=cluster, **kwargs), ray_export,
        )  # fmt: skip
    except (ValueError, RuntimeError) as err:
        progress.close()
        fail(str(err))
    progress.close()
    kept = f" ({len(report.reused)} kept from an earlier export)" if report.reused else ""
    typer.echo(
        f"{report.stage} round {report.round} -> {out}: {len(report.tars)} tars{kept}, "
        f"{report.images} images, {report.annotations} annotations"
    )
    for shard, why in report.skipped_shards.items():
        typer.echo(f"skipped {shard}: {why}")
    for image_id, why in report.skipped_images.items():
        typer.echo(f"skipped image {image_id}: {why}")


@export_app.command("coco")
def export_coco(
    store: StoreArg,
    out: Annotated[Path, typer.Option(help="COCO instances JSON file to write")],
    config: TablesConfigOpt = "sa1b",
    set_: ExportSetOpt = None,
    stage: StageOpt = None,
    round_: RoundOpt = None,
    short_side: Annotated[
        Optional[int],
        typer.Option(
            help="export.short_side: frame of the masks, shortest side in px (0: the store frame); "
            "the SA-1B release's by default"
        ),
    ] = None,
) -> None:
    """One COCO instances JSON (category "object", RLE segmentation, iscrowd 0)."""
    from sharding.export_coco import export_coco as run_export

    if out.is_dir():
        fail(
            f"--out '{out}' is a folder: pass the path of the JSON file to write, e.g. {out}/coco.json"
        )
    export_cfg = _export_config(config, set_, {"stage": stage, "round": round_, "short_side": short_side})
    try:
        counts = run_export(
            open_store(store), out, stage=export_cfg.stage, round_=export_cfg.round,
            short_side=export_cfg.short_side,
        )  # fmt: skip
    except ValueError as err:
        fail(str(err))
    typer.echo(
        f"{counts['stage']} round {counts['round']} -> {out}: {counts['images']} images, "
        f"{counts['annotations']} annotations"
    )


@export_app.command("parquet")
def export_parquet(
    store: StoreArg,
    out: Annotated[
        Path, typer.Option(help="folder for annotations/<shard>.parquet and images.parquet")
    ],
    config: TablesConfigOpt = "sa1b",
    set_: ExportSetOpt = None,
    stage: StageOpt = None,
    round_: RoundOpt = None,
) -> None:
    """Annotation tables (one row per mask) and an images table, in the store frame."""
    from sharding.export_coco import export_parquet as run_export

    check_out_folder(out, "the Parquet tables")
    export_cfg = _export_config(config, set_, {"stage": stage, "round": round_})
    try:
        counts = run_export(open_store(store), out, stage=export_cfg.stage, round_=export_cfg.round)
    except ValueError as err:
        fail(str(err))
    typer.echo(
        f"{counts['stage']} round {counts['round']} -> {out}: {counts['shards']} shards, "
        f"{counts['images']} images, {counts['annotations']} annotations"
    )


def _export_config(config: str, sets: list[str] | None, flags: dict):
    """The `export:` block with the flags given, or a one-line error."""
    from engine.cli.config import flag_overrides, load_config, section
    from sharding.export_sa1b import ExportConfig

    try:
        cfg = load_config(config, list(sets or []) + flag_overrides("export", flags))
        return section(cfg, "export", ExportConfig)
    except ValueError as err:
        fail(str(err))


def verify(
    release: Annotated[Path, typer.Argument(help="a folder written by `export sa1b`")],
) -> None:
    """Check every tar and every member of a release against SHA256SUMS and MEMBERS.tsv."""
    from sharding.verify import verify_release

    if not release.is_dir():
        fail(f"release folder '{release}' does not exist: pass the --out folder of `export sa1b`")
    problems = verify_release(release)
    for line in problems:
        typer.echo(line)
    if problems:
        fail(f"{release}: {len(problems)} problems")
    typer.echo(f"{release}: every tar and member matches its checksum")


def register(app: typer.Typer) -> None:
    app.command()(ingest)
    app.command()(status)
    app.add_typer(export_app, name="export")
    app.command()(verify)
