"""`sa-engine assisted`, `semi` and `report`: gears 1 and 2 in batch, and their effort report.

The batch commands run through the shard runner in one process (`sharding.run_stage`); the Ray
pipeline layer wires the same per-image functions onto model actors.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.cli.common import fail, require_weights
from engine.cli.predict import Device, _pick_device

StoreArg = Annotated[Path, typer.Argument(help="the store folder (made by `ingest`)")]
ModelOpt = Annotated[str, typer.Option(help="vit_b, vit_l, vit_h, or a JSON model config path.")]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option(help="SAM state dict (.pth) of this model round.")
]
RandomOpt = Annotated[
    bool, typer.Option("--random-weights", help="Run without a checkpoint (tests, benchmarks).")
]
RoundOpt = Annotated[
    int, typer.Option("--round", help="model round: outputs go to stages/<gear>/round-N/")
]
ConfigOpt = Annotated[str, typer.Option(help="config name in configs/ or a YAML path")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="override a config key, e.g. annotate.target_iou=0.8"),
]
ShardOpt = Annotated[Optional[list[str]], typer.Option("--shard", help="only this shard (repeat)")]
ReferencesOpt = Annotated[
    Optional[Path],
    typer.Option(help="COCO JSON with the reference masks the simulated annotator clicks towards"),
]


class Annotator(str, Enum):
    simulated = "simulated"
    none = "none"


def open_store(path: Path):
    from sharding.store import Store

    try:
        return Store(path)
    except ValueError as err:
        fail(str(err))


def load_predictor(
    model: str, checkpoint: Path | None, device: Device, random_weights: bool
):
    """Build the model of this round and its predictor (single-threaded-friendly on CPU)."""
    require_weights(model, checkpoint, random_weights)
    from engine.model import build_sam
    from engine.predictor import SamPredictor

    try:
        sam = build_sam(model, checkpoint=checkpoint, device=_pick_device(device))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    return SamPredictor(sam)


def annotator_config(config: str, overrides: list[str] | None):
    from engine.annotator import AnnotatorConfig
    from engine.cli.config import load_config, section

    try:
        return section(load_config(config, overrides), "annotate", AnnotatorConfig)
    except ValueError as exc:
        fail(str(exc))


def load_references(path: Path | None, annotator: Annotator):
    if annotator is Annotator.none:
        return None
    if path is None:
        fail("--annotator simulated needs --references FILE.json (COCO masks to click towards)")
    from engine.references import ReferenceSet

    try:
        refs = ReferenceSet.load(path)
    except ValueError as exc:
        fail(str(exc))
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(refs.skipped.items()))
    typer.echo(
        f"references: {refs.n_references} masks on {len(refs.images)} images from {path}"
        + (f" (left out: {skipped})" if skipped else "")
    )
    return refs


def _echo_shard(shard: str, record: dict) -> None:
    meta, counts = record.get("meta", {}), record["counts"]
    emb = meta.get("embedded", {})
    typer.echo(
        f"{shard}: {counts['images']} images, {counts['annotations']} masks accepted, "
        f"{meta.get('given_up', 0)} given up, {len(meta.get('without_references', []))} without "
        f"references, {counts['quarantined']} quarantined; embeddings {emb.get('encoded', 0)} "
        f"encoded / {emb.get('reused', 0)} reused"
    )


def assisted(
    store: StoreArg,
    annotator: Annotated[
        Annotator,
        typer.Option(help="simulated: click reference masks; none: only store the embeddings"),
    ] = Annotator.simulated,
    references: ReferencesOpt = None,
    round_: RoundOpt = 0,
    config: ConfigOpt = "sa1b",
    set_: SetOpt = None,
    model: ModelOpt = "vit_b",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present")] = Device.auto,
    shard: ShardOpt = None,
) -> None:
    """Gear 1 (assisted-manual): encode each shard's images once into the store, then annotate.

    With --annotator simulated the SAM paper's simulated annotator clicks every reference mask of
    --references (matched to store images by file path) in order of prominence; accepted masks go
    to stages/assisted/round-N/ with their effort (clicks, IoU, seconds). With --annotator none
    only the embeddings are stored, ready for people in `sa-engine serve`.
    """
    cfg = annotator_config(config, set_)
    s = open_store(store)
    refs = load_references(references, annotator)
    predictor = load_predictor(model, checkpoint, device, random_weights)
    from engine.gears.assisted import embed_store, run_assisted

    try:
        if refs is None:
            embed_store(
                s,
                predictor,
                shard,
                on_shard=lambda r: typer.echo(
                    f"{r.shard}: {r.encoded} encoded, {r.reused} already stored, "
                    f"{r.unreadable} unreadable ({r.seconds:.1f} s)"
                ),
            )
            return
        report = run_assisted(s, predictor, refs, cfg, round_, shard, on_shard=_echo_shard)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(
        f"assisted round {round_}: {len(report.processed)} shards done, {len(report.skipped)} "
        f"already done; {report.images} images, {report.annotations} masks, "
        f"{report.quarantined} quarantined in {report.seconds:.1f} s"
    )


def semi(
    store: StoreArg,
    references: ReferencesOpt = None,
    round_: RoundOpt = 0,
    detector: Annotated[
        Optional[Path],
        typer.Option(help="a trained detector (.pt); default: the round's, trained if absent"),
    ] = None,
    config: ConfigOpt = "sa1b",
    set_: SetOpt = None,
    model: ModelOpt = "vit_b",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present")] = Device.auto,
    shard: ShardOpt = None,
) -> None:
    """Gear 2 (semi-automatic): prefill images with detector boxes turned into SAM masks, then
    the simulated annotator adds only the references no prefilled mask covers.

    The object detector is trained on the store's gear-1 masks (stages/assisted) on the stored
    embeddings and saved as STORE/detectors/semi-round-N.pt (reused by later runs of the round).
    Output: stages/semi/round-N/, every mask marked prefilled or added.
    """
    cfg = annotator_config(config, set_)
    from engine.cli.config import load_config, section
    from engine.gears.semi import SemiConfig

    try:
        semi_cfg = section(load_config(config, set_), "semi", SemiConfig)
    except ValueError as exc:
        fail(str(exc))
    s = open_store(store)
    refs = load_references(references, Annotator.simulated)
    predictor = load_predictor(model, checkpoint, device, random_weights)
    from engine.gears.semi import load_or_train, run_semi

    try:
        trained = load_or_train(s, predictor, semi_cfg, round_, detector, log=typer.echo)
        report = run_semi(
            s, predictor, refs, cfg, semi_cfg, round_, trained, shard, on_shard=_echo_semi
        )
    except ValueError as exc:
        fail(str(exc))
    typer.echo(
        f"semi round {round_}: {len(report.processed)} shards done, {len(report.skipped)} "
        f"already done; {report.images} images, {report.annotations} masks, "
        f"{report.quarantined} quarantined in {report.seconds:.1f} s"
    )


def _echo_semi(shard: str, record: dict) -> None:
    meta = record.get("meta", {})
    typer.echo(
        f"{shard}: {meta.get('prefilled', 0)} prefilled masks ({meta.get('covered_by_prefill', 0)} "
        f"references covered by them), {record['counts']['annotations'] - meta.get('prefilled', 0)} "
        f"added, {meta.get('given_up', 0)} given up"
    )


def report(
    store: StoreArg,
    out: Annotated[
        Optional[Path], typer.Option(help="also write effort.json, effort.txt and effort.png here")
    ] = None,
) -> None:
    """Annotation effort per gear and model round: masks per image, clicks per mask, IoU at
    acceptance, seconds per mask, prefilled vs added (a table; --out adds a PNG plot)."""
    from engine.gears.effort import effort_rows, format_table, write_report

    s = open_store(store)
    rows = effort_rows(s)
    if not rows:
        fail(f"{store} has no finished gear 1 or 2 shards: run `sa-engine assisted` first")
    typer.echo(format_table(rows))
    if out is not None:
        for path in write_report(rows, out):
            typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """`run assisted` / `run semi` beside `run auto` and `run privacy` (one shape for every stage);
    the short top-level names stay as hidden aliases."""
    from engine.cli.run import run_app

    run_app.command(name="assisted")(assisted)
    run_app.command(name="semi")(semi)
    app.command(name="assisted", hidden=True)(assisted)
    app.command(name="semi", hidden=True)(semi)
    app.command(name="report")(report)
