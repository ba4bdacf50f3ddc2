"""`sa-engine run assisted`, `run semi` and `report`: gears 1 and 2 in batch, and their effort
report.

The batch commands are Ray Data pipelines over the store's shards (`stages/assisted.py`,
`stages/semi.py` on `stages.pipeline`), with `run auto`'s shape: `--config`, `--set ray.*`,
`--address` (or RAY_ADDRESS; else an embedded local Ray on 127.0.0.1); the model is the config's
`model:` block (default: the bundled model), which --model / --checkpoint / --device override.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.cli.common import (
    Device,
    check_out_folder,
    config_option,
    fail,
    model_config,
    model_sets,
    open_store,
    set_option,
)
from engine.cli.run import AddressOpt, run_spec, stage_setup

StoreArg = Annotated[Path, typer.Argument(help="the store folder (made by `ingest`)")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(help="model.model: default (bundled), vit_b, vit_l, vit_h, or a JSON config"),
]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option(help="model.checkpoint: SAM state dict (.pth) of this model round")
]
RandomOpt = Annotated[
    bool, typer.Option("--random-weights", help="Run without a checkpoint (tests, benchmarks).")
]
DeviceOpt = Annotated[
    Optional[Device], typer.Option(help="model.device (auto: CUDA when present)")
]
RoundOpt = Annotated[
    int,
    typer.Option(
        "--round",
        help="model round N: outputs go to stages/<gear>/round-N/; N >= 1 runs the store's "
        "model round N unless --model/--checkpoint name one",
    ),
]
AssistedConfigOpt = config_option("model:, annotate: and ray: blocks")
SemiConfigOpt = config_option("model:, annotate:, semi: and ray: blocks")
SetOpt = set_option("annotate.target_iou=0.8")
ShardOpt = Annotated[Optional[list[str]], typer.Option("--shard", help="only this shard (repeat)")]
ReferencesOpt = Annotated[
    Optional[Path],
    typer.Option(help="COCO JSON with the reference masks the simulated annotator clicks towards"),
]


class Annotator(str, Enum):
    simulated = "simulated"
    none = "none"


def block(cfg: dict, name: str, cls):
    from engine.cli.config import section

    try:
        return section(cfg, name, cls)
    except ValueError as exc:
        fail(str(exc))


def load_references(path: Path | None, annotator: Annotator):
    if annotator is Annotator.none:
        return None
    if path is None:
        fail("--annotator simulated needs --references FILE.json (COCO masks to click towards)")
    from engine.references import ReferenceSet

    try:
        refs = ReferenceSet.load(path.resolve())
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


def _echo_embedded(shard: str, record: dict) -> None:
    e = record["meta"]["embedded"]
    typer.echo(
        f"{shard}: {e['encoded']} encoded, {e['reused']} already stored, {e['unreadable']} "
        f"unreadable ({e['seconds']:.1f} s)"
    )


def assisted(
    store: StoreArg,
    annotator: Annotated[
        Annotator,
        typer.Option(help="simulated: click reference masks; none: only store the embeddings"),
    ] = Annotator.simulated,
    references: ReferencesOpt = None,
    round_: RoundOpt = 0,
    config: AssistedConfigOpt = "sa1b",
    set_: SetOpt = None,
    address: AddressOpt = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    device: DeviceOpt = None,
    shard: ShardOpt = None,
) -> None:
    """Gear 1 (assisted-manual) on Ray: encode each image once, then annotate its references.

    Model actors encode each image once into the store; then the simulated annotator clicks its
    references.

    With --annotator simulated the SAM paper's simulated annotator clicks every reference mask of
    --references (matched to store images by file path) in order of prominence; accepted masks go
    to stages/assisted/round-N/ with their effort (clicks, IoU, seconds). With --annotator none
    only the embeddings are stored, ready for people in `sa-engine serve`.
    """
    sets = model_sets(set_, model, checkpoint, device, store=store, round_=round_)
    st, cfg, ray_cfg = stage_setup(store, config, sets, address)
    from engine.annotator import AnnotatorConfig

    annotate_cfg = block(cfg, "annotate", AnnotatorConfig)
    model_cfg = model_config(cfg, random_weights)
    refs = load_references(references, annotator)
    root = str(st.root.resolve())
    try:
        if refs is None:
            from stages.assisted import embeddings_spec

            spec, meta = embeddings_spec(model_cfg, _fingerprint(model_cfg), root)
            run_spec(st, spec, round_, ray_cfg, shard, meta, on_shard=_echo_embedded)
            return
        from stages.assisted import assisted_spec

        spec, meta = assisted_spec(model_cfg, annotate_cfg, refs.path, root)
    except ValueError as exc:
        fail(str(exc))
    run_spec(st, spec, round_, ray_cfg, shard, meta, on_shard=_echo_shard)


def _fingerprint(model_cfg) -> str:
    """The encoder fingerprint of the model (built on the CPU here, only to find the images that
    have no embedding by it yet)."""
    import dataclasses

    from engine.model import load_model
    from engine.predictor import encoder_fingerprint

    try:
        return encoder_fingerprint(load_model(dataclasses.replace(model_cfg, device="cpu")))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def semi(
    store: StoreArg,
    references: ReferencesOpt = None,
    round_: RoundOpt = 0,
    detector: Annotated[
        Optional[Path],
        typer.Option(help="a trained detector (.pt); default: the round's, trained if absent"),
    ] = None,
    config: SemiConfigOpt = "sa1b",
    set_: SetOpt = None,
    address: AddressOpt = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    device: DeviceOpt = None,
    shard: ShardOpt = None,
) -> None:
    """Gear 2 (semi-automatic) on Ray: prefill detector-box masks, then add what they miss.

    Images are prefilled with detector boxes turned into SAM masks; then the simulated annotator
    adds only the references no prefilled mask covers.

    The object detector is trained once, here, on the store's gear-1 masks (stages/assisted) on
    the stored embeddings and saved as STORE/detectors/semi-round-N.pt (reused by later runs of
    the round); every model actor loads it. Output: stages/semi/round-N/, every mask marked
    prefilled or added.
    """
    sets = model_sets(set_, model, checkpoint, device, store=store, round_=round_)
    st, cfg, ray_cfg = stage_setup(store, config, sets, address)
    from engine.annotator import AnnotatorConfig
    from engine.gears.semi import SemiConfig

    annotate_cfg = block(cfg, "annotate", AnnotatorConfig)
    semi_cfg = block(cfg, "semi", SemiConfig)
    model_cfg = model_config(cfg, random_weights)
    refs = load_references(references, Annotator.simulated)
    from engine.gears.embeddings import load_predictor
    from engine.gears.semi import load_or_train, round_detector
    from stages.semi import semi_spec

    try:
        predictor = load_predictor(model_cfg)
        trained = load_or_train(st, predictor, semi_cfg, round_, detector, log=typer.echo)
        path = str(round_detector(st, round_, detector))
        del predictor  # the actors load their own
        spec, meta = semi_spec(
            model_cfg, annotate_cfg, semi_cfg, refs.path, path, trained.trained_on, round_,
            str(st.root.resolve()),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    run_spec(st, spec, round_, ray_cfg, shard, meta, on_shard=_echo_semi)


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
    """Annotation effort per gear and model round (a table; --out adds a PNG plot).

    Masks per image, clicks per mask, IoU at acceptance, seconds per mask, prefilled vs added.
    """
    from engine.gears.effort import effort_rows, format_table, write_report

    if out is not None:
        check_out_folder(out, "the effort report")
    s = open_store(store)
    rows = effort_rows(s)
    if not rows:
        fail(f"{store} has no finished gear 1 or 2 shards: run `sa-engine run assisted` first")
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
