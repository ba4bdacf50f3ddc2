"""`sa-engine run <stage> STORE`: a stage over a store's pending shards, as a Ray Data pipeline.

Without `--address` (or `RAY_ADDRESS`) an embedded local Ray starts on 127.0.0.1 and stops with
the command; with it the same command joins a running cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from engine.cli.common import (
    Device,
    config_option,
    fail,
    model_config,
    model_sets,
    set_option,
    sigterm_as_ctrl_c,
)

run_app = typer.Typer(
    help="Run a stage over a store's shards on Ray (embedded local Ray, or --address CLUSTER).",
    no_args_is_help=True,
)

StoreArg = Annotated[Path, typer.Argument(help="the store folder (on a cluster: shared storage)")]
AutoConfigOpt = config_option("model:, amg: and ray: blocks")
AutoSetOpt = set_option("ray.model_actors=4")
PrivacyConfigOpt = config_option("privacy: and ray: blocks")
PrivacySetOpt = set_option("privacy.face_score=0.8")
ClassicalConfigOpt = config_option("ray: block")
ClassicalSetOpt = set_option("ray.num_cpus=2")
RoundOpt = Annotated[
    int,
    typer.Option(
        "--round",
        help="model round the outputs belong to (a model stage with N >= 1 runs the store's "
        "model round N unless a model is named)",
    ),
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option(help="join this Ray cluster (ray.address; default: RAY_ADDRESS, else local)"),
]
ShardOpt = Annotated[
    Optional[list[str]], typer.Option("--shard", help="only these shards (repeatable)")
]


def stage_setup(store: Path, config: str, sets: list[str] | None, address: str | None):
    """Open the store and read the config; every flag is a config key (--address: ray.address)."""
    from engine.cli.config import load_config, section
    from sharding.store import Store
    from stages.config import RayConfig

    overrides = list(sets or [])
    if address:
        overrides.append(f"ray.address={address}")
    try:
        cfg = load_config(config, overrides)
        return Store(store), cfg, section(cfg, "ray", RayConfig)
    except ValueError as err:
        fail(str(err))


def run_spec(
    store, spec, round_: int, ray_cfg, shards, meta: dict[str, Any], on_shard=None
) -> None:
    """Run a stage on Ray (`stage_setup`'s store and `ray:` block); print its summary. on_shard:
    called with (shard, completion record) after each commit (a line per shard)."""
    from stages.cluster import ray_session
    from stages.pipeline import run_pipeline

    terminated: list[int] = []
    try:
        if shards:
            store.check_shards(shards)  # (before Ray starts)
        with ray_session(ray_cfg, store) as where:
            # (after Ray's start, whose driver handler would end the process on the spot,
            # leaving the run record at "running" and the embedded Ray's processes behind)
            with sigterm_as_ctrl_c() as terminated:
                typer.echo(f"{spec.name} round {round_} on {where}", err=True)
                record = run_pipeline(
                    store, spec, round_, ray_cfg, shards=shards, where=where, meta=meta,
                    on_shard=on_shard,
                )  # fmt: skip
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    except KeyboardInterrupt:
        typer.echo(
            f"{spec.name} round {round_}: stopped; committed shards stay, the same command goes on",
            err=True,
        )
        raise typer.Exit(code=143 if terminated else 130) from None
    for line in summary_lines(record):
        typer.echo(line)


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The run summary a stage command prints (the full record is in STORE/runs/<stage>/)."""
    steps = record["step_seconds"]
    lines = [
        f"{record['stage']} round {record['round']}: {len(record['processed'])} shard(s) committed, "
        f"{len(record['skipped'])} already done, {len(record['unfinished'])} unfinished",
        f"images {record['images']}, masks {record['annotations']}, "
        f"quarantined {record['quarantined']}",
        f"{steps['wall']:.1f} s: {record['throughput']['images_per_s']:.2f} images/s, "
        f"{record['throughput']['masks_per_s']:.1f} masks/s; summed over tasks: decode "
        f"{steps['decode']:.1f} s, model {steps['model']:.1f} s, post {steps['post']:.1f} s, "
        f"commit {steps['commit']:.1f} s",
        f"plan: {record['plan']['actors']} model actor(s) x "
        + (
            f"{record['plan']['num_gpus']:g} GPU"
            if record["plan"]["num_gpus"]
            else f"{record['plan']['num_cpus']:g} CPU"
        )
        + f", {record['plan']['threads']} thread(s); failures recovered: {len(record['failures'])}",
    ]
    if record.get("held_by_sessions"):
        held = record["held_by_sessions"]
        lines.append(
            f"{len(held)} shard(s) left to the annotation sessions holding them (`sa-engine status` "
            f"says whose): {', '.join(held[:20])}{' ...' if len(held) > 20 else ''}"
        )
    for q in record["quarantined_inputs"][:20]:
        lines.append(f"  quarantined {q['source']}: {q['reason']} ({q['detail']})")
    lines.append(f"run record: {record['record_path']}")
    return lines


@run_app.command("auto")
def auto(
    store: StoreArg,
    config: AutoConfigOpt = "sa1b",
    set_: AutoSetOpt = None,
    round_: RoundOpt = 0,
    address: AddressOpt = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="model.model: default (bundled), vit_b/vit_l/vit_h or a JSON config"),
    ] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="model.checkpoint (.pth)")] = None,
    device: Annotated[
        Optional[Device], typer.Option(help="model.device of the model actors (auto: CUDA when present)")
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option("--random-weights", help="Run a model without weights (tests, benchmarks)."),
    ] = False,
    shard: ShardOpt = None,
) -> None:
    """Gear 3: SAM's automatic mask generator over every pending shard (one actor per GPU).

    --round N >= 1 runs the store's model round N (`sa-engine train`) unless a model is named.
    A model without weights (vit_b with no --checkpoint) is refused: its masks would be noise."""
    sets = model_sets(set_, model, checkpoint, device, store=store, round_=round_)
    st, cfg, ray_cfg = stage_setup(store, config, sets, address)
    from engine.amg_config import AmgConfig
    from engine.cli.config import section
    from stages.auto import auto_spec

    model_cfg = model_config(cfg, random_weights)  # (a name it does not know fails here too)
    try:
        spec, meta = auto_spec(model_cfg, section(cfg, "amg", AmgConfig))
    except ValueError as err:
        fail(str(err))
    run_spec(st, spec, round_, ray_cfg, shard, meta)


@run_app.command("privacy")
def privacy(
    store: StoreArg,
    config: PrivacyConfigOpt = "sa1b",
    set_: PrivacySetOpt = None,
    round_: RoundOpt = 0,
    address: AddressOpt = None,
    shard: ShardOpt = None,
) -> None:
    """Blur faces and licence plates of every pending shard (outputs: STORE/stages/privacy/)."""
    st, cfg, ray_cfg = stage_setup(store, config, set_, address)
    from engine.cli.config import section
    from engine.privacy import PrivacyConfig
    from stages.privacy import detector_metadata, privacy_spec

    try:
        privacy_cfg = section(cfg, "privacy", PrivacyConfig)
        meta = detector_metadata(privacy_cfg)
    except ValueError as err:
        fail(str(err))
    run_spec(st, privacy_spec(privacy_cfg), round_, ray_cfg, shard, meta)


@run_app.command("classical")
def classical(
    store: StoreArg,
    config: ClassicalConfigOpt = "sa1b",
    set_: ClassicalSetOpt = None,
    round_: RoundOpt = 0,
    address: AddressOpt = None,
    shard: ShardOpt = None,
) -> None:
    """Model-free stand-in stage (Otsu + connected components), no weights needed.

    It checks a cluster and a store end to end (outputs: STORE/stages/classical/).
    """
    st, _, ray_cfg = stage_setup(store, config, set_, address)
    from stages.classical import classical_spec

    run_spec(st, classical_spec(), round_, ray_cfg, shard, {})


def register(app: typer.Typer) -> None:
    app.add_typer(run_app, name="run")
