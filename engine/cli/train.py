"""`sa-engine train` (retrain SAM on a store's masks, write the next model round) and
`sa-engine evaluate` (the gate: compare a round with the current one, promote only if better).

`train` runs in this process, or with `--address` (or RAY_ADDRESS) on a Ray cluster's Ray Train
workers (engine/training/cluster.py): the same training loop, and the same round written (by rank 0).
"""

from __future__ import annotations

import collections
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from engine.cli.common import config_option, fail, set_option

if TYPE_CHECKING:
    from engine.modeling import Sam
    from engine.training.cluster import WorkerConfig
    from engine.training.trainer import TrainConfig, TrainResult

TrainConfigOpt = config_option("train: block (the recipe, its gate: and the workers)")
EvaluateConfigOpt = config_option("train: block's gate:")
TrainSetOpt = set_option("train.steps=500")
EvaluateSetOpt = set_option("train.gate.max_masks=200")
ScenesOpt = Annotated[
    Optional[int], typer.Option(help="train.synthetic_scenes: scenes for --from synthetic (600)")
]
SeedOpt = Annotated[
    Optional[int], typer.Option(help="train.synthetic_seed: first scene seed for --from synthetic (0)")
]


def _sources(
    store: Path,
    gears: str | None,
    max_round: int | None,
    coco: Path | None,
    images: Path | None,
    synthetic_scenes: int,
    synthetic_seed: int,
    split: str,
    held_out_share: float,
):
    """Items and data descriptions from --from (gears or 'synthetic') and --coco/--images."""
    from engine.training.data import SYNTHETIC, coco_items, store_items, synthetic_items

    items, infos = [], []
    names = _from_names(gears)
    if SYNTHETIC in names:
        names.remove(SYNTHETIC)
        got, info = synthetic_items(synthetic_scenes, synthetic_seed, split, held_out_share)
        items += got
        infos.append(info)
    if names:
        got, info = store_items(store, names, max_round, split, held_out_share)
        items += got
        infos.append(info)
    if (coco is None) != (images is None):
        raise ValueError("--coco FILE.json and --images DIR go together: give both or neither")
    if coco is not None:
        got, info = coco_items(coco, images, split, held_out_share)
        items += got
        infos.append(info)
    if not infos:
        raise ValueError(
            "no training data: pass --from GEAR[,GEAR] (store stages, or 'synthetic') and/or "
            "--coco FILE.json --images DIR"
        )
    return items, infos


def _from_names(from_: str | None) -> list[str]:
    """The gears (and 'synthetic') a comma-separated --from names."""
    return [g.strip() for g in (from_ or "").split(",") if g.strip()]


def _source_kinds(from_: str | None, coco: Path | None) -> list[str]:
    """The kinds of image sources --from and --coco name (`training.data` info "source")."""
    from engine.training.data import SYNTHETIC

    names = set(_from_names(from_))
    kinds = [SYNTHETIC] if SYNTHETIC in names else []
    kinds += ["store"] if names - {SYNTHETIC} else []
    return kinds + (["coco"] if coco is not None else [])


def _synthetic_flags(from_: str | None, data: Any) -> dict[str, Any]:
    """The synthetic scenes' flags of a recorded command line, when it reads them."""
    from engine.training.data import SYNTHETIC

    if SYNTHETIC not in _from_names(from_):
        return {}
    return {"--synthetic-scenes": data.synthetic_scenes, "--synthetic-seed": data.synthetic_seed}


def _train_config(config: str, overrides: list[str] | None):
    """(TrainConfig, GateConfig, WorkerConfig, DataConfig) of the `train:` block: the recipe, its
    `gate:` sub-block, the cluster keys (workers, cpus_per_worker) and the data keys
    (held_out_share, synthetic_scenes, synthetic_seed)."""
    import dataclasses

    from engine.cli.config import load_config, section
    from engine.training.cluster import WorkerConfig
    from engine.training.data import DataConfig
    from engine.training.gate import GateConfig
    from engine.training.trainer import TrainConfig

    cfg = load_config(config, overrides)
    block = dict(cfg.get("train") or {})
    gate = block.pop("gate", None) or {}

    def keys_of(cls) -> dict:
        return {f.name: block.pop(f.name) for f in dataclasses.fields(cls) if f.name in block}

    cluster, data = keys_of(WorkerConfig), keys_of(DataConfig)
    train_cfg = section({"train": block}, "train", TrainConfig)
    gate_cfg = section({"train.gate": gate}, "train.gate", GateConfig)
    worker_cfg = section({"train": cluster}, "train", WorkerConfig)
    data_cfg = section({"train": data}, "train", DataConfig)
    return train_cfg, gate_cfg, worker_cfg, data_cfg


def _data_sets(
    sets: list[str] | None, held_out_share: float | None, scenes: int | None, seed: int | None
) -> list[str]:
    """`--set` overrides plus the data flags as `train.*` keys."""
    from engine.cli.config import flag_overrides

    flags = {"held_out_share": held_out_share, "synthetic_scenes": scenes, "synthetic_seed": seed}
    return list(sets or []) + flag_overrides("train", flags)


@dataclass
class _Job:
    """One `train` run as data, for this process or every Ray Train worker: build the start model,
    read the training images, and (one process / rank 0) write model round `new_round`.

    Paths are absolute: on a cluster the store is shared storage and workers run elsewhere.
    """

    store: Path
    sources: dict[str, Any]  # _sources() arguments but the split
    parent: int
    init: str | None
    config: "TrainConfig"
    new_round: int
    card: dict[str, Any]  # the card's fields known before training

    def model(self) -> "Sam":
        if self.init is None:
            from engine.training.registry import ModelRegistry

            return ModelRegistry(self.store).load(self.parent)
        import torch

        from engine.model import build_sam

        torch.manual_seed(self.config.seed)  # the fresh neck/decoder init is part of the recipe
        return build_sam(self.init)

    def items(self) -> list:
        return _sources(self.store, **self.sources, split="train")[0]

    def finish(self, sam: "Sam", result: "TrainResult", how: dict[str, Any]) -> dict[str, Any]:
        """Write the round (checkpoint + card); `how` says where it was trained."""
        import datetime as dt
        import platform

        import torch

        from engine.training.registry import ModelRegistry, portable_config
        from engine.training.trainer import training_summary

        card = {
            "parent_round": self.card["parent_round"],
            "started_from": self.card["started_from"],
            "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.card["command"],
            "model_config": portable_config(sam),
            "data": self.card["data"],
            "train_config": vars(self.config),
            "training": training_summary(result),
            "distributed": how,
            "environment": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
            "evaluations": [],
        }
        files = ModelRegistry(self.store).write_round(self.new_round, sam, card)
        return {
            "checkpoint": str(files.checkpoint),
            "card": str(files.card),
            "loss_first": card["training"]["loss_first"],
            "loss_last": card["training"]["loss_last"],
            "loss_windows": len(card["training"]["loss_history"]),
        }


def _command_line(command: str, positional: Path, options: dict[str, object]) -> str:
    """The command as it can be run again, rebuilt from the parsed options (None ones left out)."""
    parts = ["sa-engine", command, str(positional)]
    for flag, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def train(
    store: Annotated[Path, typer.Argument(help="The store folder (its models/ registry is written).")],
    from_: Annotated[
        Optional[str],
        typer.Option(
            "--from",
            help="Gears whose masks to train on, comma-separated store stages (assisted, semi, "
            "auto), or 'synthetic' for generated scenes.",
        ),
    ] = None,
    round_: Annotated[
        Optional[int],
        typer.Option(
            "--round",
            help="Parent model round N (default: the current one); round N+1 is written. Gear "
            "masks of stage rounds <= N are used. -1 with --init makes round 0.",
        ),
    ] = None,
    coco: Annotated[Optional[Path], typer.Option(help="Extra masks: a COCO instances JSON.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder of --coco.")] = None,
    init: Annotated[
        Optional[str],
        typer.Option(
            help="Start from this model (registry name or JSON config) instead of the parent "
            "round's weights, e.g. mobilenet_v2 (ImageNet backbone, untrained decoder)."
        ),
    ] = None,
    synthetic_scenes: ScenesOpt = None,
    synthetic_seed: SeedOpt = None,
    held_out_share: Annotated[
        Optional[float],
        typer.Option(
            help="train.held_out_share: share of images kept out of training for the gate (0.1)"
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(help="torch CPU threads (0: torch's default; with --address: the worker's CPUs)."),
    ] = 0,
    address: Annotated[
        Optional[str],
        typer.Option(
            help="Train on this Ray cluster with Ray Train, one worker per GPU (CPU-only: "
            "train.workers); default: RAY_ADDRESS, else this process alone."
        ),
    ] = None,
    config: TrainConfigOpt = "sa1b",
    set_: TrainSetOpt = None,
) -> None:
    """Retrain SAM on the masks collected in a store; write model round N+1 (checkpoint + card)."""
    try:
        sets = _data_sets(set_, held_out_share, synthetic_scenes, synthetic_seed)
        train_cfg, _, worker_cfg, data_cfg = _train_config(config, sets)
        train_cfg.validate()
        worker_cfg.validate()
    except ValueError as exc:
        fail(str(exc))

    import torch

    from engine.training.registry import ModelRegistry
    from engine.training.trainer import train as run_training

    address = address or os.environ.get("RAY_ADDRESS") or None
    if threads > 0:
        torch.set_num_threads(threads)
    if not store.is_dir():
        fail(f"store {store} does not exist: create it with `sa-engine ingest` (or mkdir for synthetic)")
    registry = ModelRegistry(store)
    parent = registry.current() if round_ is None else round_
    if parent < -1 or (parent == -1 and init is None):
        fail(f"--round {parent}: use a model round >= 0 (or -1 together with --init to make round 0)")
    new_round = parent + 1
    sources = {
        "gears": from_, "max_round": max(parent, 0), "coco": coco, "images": images,
        "synthetic_scenes": data_cfg.synthetic_scenes, "synthetic_seed": data_cfg.synthetic_seed,
        "held_out_share": data_cfg.held_out_share,
    }
    try:
        items, infos = _sources(store, **sources, split="train")
        if init is not None:
            from engine.model import resolve_config

            resolve_config(init)
        else:
            registry.files(parent)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if (registry.round_dir(new_round) / "card.json").is_file():  # (after the inputs' own errors)
        fail(f"model round {new_round} already exists in {registry.round_dir(new_round)}")
    start = f"init:{init}" if init is not None else f"round-{parent}"
    absolute = {k: v.resolve() if isinstance(v, Path) else v for k, v in sources.items()}
    job = _Job(
        store=store.resolve(),
        sources=absolute,
        parent=parent,
        init=init,
        config=train_cfg,
        new_round=new_round,
        card={
            "parent_round": parent if init is None else None,
            "started_from": start,
            "command": _command_line(
                "train",
                store,
                {
                    "--from": from_, "--round": parent, "--init": init, "--coco": coco,
                    "--images": images,
                    **_synthetic_flags(from_, data_cfg),
                    "--held-out-share": data_cfg.held_out_share, "--threads": threads or None,
                    "--address": address, "--config": config, "--set": set_ or None,
                },
            ),
            "data": infos,
        },
    )
    if address is None:
        try:
            sam = job.model()
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
        typer.echo(f"training round {new_round} from {start} on {len(items)} images")
        try:
            result = run_training(sam, items, train_cfg, log=typer.echo)
        except ValueError as exc:
            fail(str(exc))
        written = job.finish(sam, result, {"workers": 1, "backend": None, "address": None})
    else:
        written = _train_on_cluster(job, address, worker_cfg, threads, len(items), start)
    if written["loss_windows"] > 1:
        loss = f"loss {written['loss_first']:.4f} -> {written['loss_last']:.4f}"
    else:  # one progress window: no trend to show
        loss = (f"loss {written['loss_last']:.4f} (the mean over all {train_cfg.steps} steps; set "
                f"train.log_every below train.steps to see its trend)")
    judge = _command_line(
        "evaluate", store,
        {"--candidate": new_round, "--from": from_, "--coco": coco, "--images": images,
         **_synthetic_flags(from_, data_cfg), "--held-out-share": data_cfg.held_out_share},
    )  # fmt: skip  (the same data: the gate scores on its held-out share)
    typer.echo(
        f"wrote model round {new_round}: {written['checkpoint']} and {written['card']}; {loss}. "
        f"Judge it with `{judge}` before it is used."
    )


def _train_on_cluster(
    job: _Job, address: str, worker_cfg: "WorkerConfig", threads: int, images: int, start: str
) -> dict[str, Any]:
    """Join the cluster, size the worker group from its nodes and train there (rank 0 writes)."""
    import datetime as dt

    import ray

    from engine.training.cluster import plan_workers, train_on_ray
    from stages.cluster import check_reachable

    try:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(f"cannot join the Ray cluster at {address}: {exc}")
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        try:
            plan = plan_workers(nodes, worker_cfg)
        except ValueError as exc:
            fail(str(exc))
        if images < plan.workers:
            fail(
                f"{images} training image(s) for {plan.workers} workers: every worker needs at "
                "least one; lower train.workers or add data"
            )
        typer.echo(
            f"training round {job.new_round} from {start} on {images} images, cluster {address} "
            f"({len(nodes)} node(s)): {plan.describe()}"
        )
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        try:
            return train_on_ray(
                job,
                plan,
                storage_path=str(job.store / "runs" / "train"),
                name=f"round-{job.new_round}-{when}",
                address=address,
                threads=threads or None,
            )
        except (ValueError, RuntimeError) as exc:
            fail(str(exc))
    finally:
        ray.shutdown()


def evaluate(
    store: Annotated[Path, typer.Argument(help="The store folder holding the model registry.")],
    candidate: Annotated[
        Optional[int], typer.Option(help="Round to judge (default: the newest round).")
    ] = None,
    against: Annotated[
        Optional[str],
        typer.Option(help="Round to compare with (default: the current one); 'none' only scores."),
    ] = None,
    from_: Annotated[
        Optional[str],
        typer.Option("--from", help="Held-out masks of these gears (comma-separated), or 'synthetic'."),
    ] = None,
    coco: Annotated[Optional[Path], typer.Option(help="Held-out masks: a COCO instances JSON.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder of --coco.")] = None,
    split: Annotated[
        str, typer.Option(help="held_out (images training never sees) or all (a separate test set).")
    ] = "held_out",
    held_out_share: Annotated[
        Optional[float],
        typer.Option(
            help="train.held_out_share: default the smallest share the scored rounds were trained "
            "with (their cards), else the config's; a larger one is refused (it would score a round "
            "on its training images)"
        ),
    ] = None,
    synthetic_scenes: ScenesOpt = None,
    synthetic_seed: SeedOpt = None,
    promote: Annotated[
        bool, typer.Option("--promote/--no-promote", help="Make the candidate current if it passes.")
    ] = True,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default).")] = 0,
    config: EvaluateConfigOpt = "sa1b",
    set_: EvaluateSetOpt = None,
) -> None:
    """Gate: score a candidate round and the current one on held-out masks; promote if better."""
    import datetime as dt
    import json

    import torch

    from engine.atomic import atomic_write_json
    from engine.training.gate import decide, gate_held_out_share, score_model
    from engine.training.registry import ModelRegistry

    if threads > 0:
        torch.set_num_threads(threads)
    try:
        sets = _data_sets(set_, held_out_share, synthetic_scenes, synthetic_seed)
        _, gate_cfg, _, data_cfg = _train_config(config, sets)
        gate_cfg.validate()
    except ValueError as exc:
        fail(str(exc))
    registry = ModelRegistry(store)
    rounds = registry.rounds()
    cand = candidate if candidate is not None else (rounds[-1] if rounds else 0)
    if against is None:
        base: int | None = registry.current()
    elif against.lower() == "none":
        base = None
    else:
        try:
            base = int(against)
        except ValueError:
            fail(f"--against '{against}': give a round number or 'none'")
    if base == cand:
        base = None
    try:
        share = data_cfg.held_out_share  # (--split all scores every image)
        if split == "held_out":
            scored = [cand] if base is None else [cand, base]
            kinds = _source_kinds(from_, coco)
            share = gate_held_out_share(
                registry, scored, held_out_share, data_cfg.held_out_share, kinds
            )
        items, infos = _sources(
            store, from_, None, coco, images, data_cfg.synthetic_scenes, data_cfg.synthetic_seed,
            split, share,
        )
        if split == "held_out" and not items:
            raise ValueError(
                f"no held-out images at share {share:g}"
                + (" (the scored rounds were trained on every image)" if share == 0 else "")
                + ": score on a separate test set (--split all --coco FILE.json --images DIR), "
                "or retrain with a held-out share (train.held_out_share)"
            )
        models = {cand: registry.load(cand)}
        if base is not None:
            models[base] = registry.load(base)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    scores = {}
    for round_, sam in models.items():
        held = f"held-out images (share {share:g})" if split == "held_out" else "images (--split all)"
        typer.echo(f"scoring round {round_} on {len(items)} {held}")
        try:
            scores[round_] = score_model(sam, items, gate_cfg, log=typer.echo)
        except ValueError as exc:
            fail(str(exc))
    decision = decide(scores[cand], scores.get(base), gate_cfg)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    promoted = bool(promote and decision.promote and base is not None)
    report = {
        "candidate": cand,
        "against": base,
        "created_at": when,
        "command": _command_line(
            "evaluate",
            store,
            {
                "--candidate": cand, "--against": "none" if base is None else base,
                "--from": from_, "--coco": coco, "--images": images, "--split": split,
                "--held-out-share": share if split == "held_out" else None,
                **_synthetic_flags(from_, data_cfg),
                "--no-promote": not promote, "--threads": threads or None, "--config": config,
                "--set": set_ or None,
            },
        ),
        "data": infos,
        "gate_config": vars(gate_cfg),
        "scores": {str(r): s.as_dict() for r, s in scores.items()},
        "passes": decision.promote,
        "reason": decision.reason,
        "deltas": decision.deltas,
        "promoted": promoted,
    }
    folder = registry.round_dir(cand)
    report_path = None
    if not registry.files(cand).bundled:
        report_path = folder / f"gate-vs-{'none' if base is None else f'round-{base}'}.json"
        atomic_write_json(report_path, report, indent=1)
        card = registry.card(cand)
        card.setdefault("evaluations", []).append(
            {k: report[k] for k in ("against", "created_at", "command", "data", "scores", "reason")}
        )
        atomic_write_json(folder / "card.json", card, indent=1)
    if promoted:
        registry.promote(cand, report_path, when)
    typer.echo(_table(scores, gate_cfg))
    left_out = scores[cand].skipped
    if left_out:
        reasons = collections.Counter(s["reason"] for s in left_out)
        typer.echo(
            f"{len(left_out)} image(s) left out of the scores ("
            + ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
            + f"); the scores cover {scores[cand].images} image(s)"
            + (f": each listed in {report_path}" if report_path else "")
        )
    verdict = "PROMOTED" if promoted else ("passes" if decision.promote else "REFUSED")
    typer.echo(f"round {cand} vs {base if base is not None else '-'}: {verdict} ({decision.reason})")
    if report_path:
        typer.echo(f"report: {report_path}")
    typer.echo(json.dumps({"passes": decision.promote, "promoted": promoted, "deltas": decision.deltas}))


def _table(scores, gate_cfg) -> str:
    target = f"clicks to {gate_cfg.target_iou:g}"
    lines = [f"{'round':>5}  {'mIoU 1 click':>12}  {'mIoU 5 clicks':>13}  {target:>14}  {'reached':>7}  masks"]
    for round_, s in scores.items():
        lines.append(
            f"{round_:>5}  {s.miou_1click:>12.3f}  {s.miou_5clicks:>13.3f}  "
            f"{s.clicks_to_target:>14.2f}  {s.reached_share:>7.1%}  {s.masks}"
        )
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command(name="train")(train)
    app.command(name="evaluate")(evaluate)
