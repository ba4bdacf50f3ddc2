"""Small helpers every CLI command shares: the --config / --set options, failing with a clear
message, the files of an input folder, the model flags as `model:` keys."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, NoReturn, Optional, TypeVar

import typer

T = TypeVar("T")


class Device(str, Enum):
    """The values of the commands' --device option (`model.device`; any torch device via --set)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def config_option(blocks: str) -> Any:
    """The `--config` option of a command that reads `blocks` of the config (its help says which)."""
    return Annotated[
        str,
        typer.Option(
            "--config",
            help="config: a name in configs/ (sa1b: the paper's settings; meta-default: Meta's "
            f"library defaults) or a YAML path; this command reads its {blocks}",
        ),
    ]


def set_option(example: str) -> Any:
    """The repeatable `--set block.key=value` option (`engine.cli.config.apply_overrides`)."""
    return Annotated[
        Optional[list[str]],
        typer.Option("--set", help=f"override a config key, e.g. {example} (repeatable)"),
    ]


def ray_option(block: str, work: str, local: str = "in this process") -> Any:
    """The `--ray/--local` option of a `here_or_on_ray` command: `block.ray`, run `work` as Ray tasks."""
    return Annotated[
        Optional[bool],
        typer.Option(
            "--ray/--local",
            help=f"{block}.ray: {work} as Ray tasks (on --address / RAY_ADDRESS, else an embedded "
            f"local Ray); --local (default): {local}",
        ),
    ]


def address_option(verb: str) -> Any:
    """The `--address` option of a `here_or_on_ray` command (`ray.address`, implies --ray)."""
    return Annotated[
        Optional[str], typer.Option(help=f"ray.address: {verb} on this Ray cluster (implies --ray)")
    ]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """Within the block SIGTERM (`kill`, a service manager, a scheduler's stop) raises
    KeyboardInterrupt, so a command stops as Ctrl-C stops it; the yielded list gets the signal's
    number when it came (exit 143, not 130). The previous handler comes back after (SIG_DFL
    where it was not set from Python: Ray's driver installs its own, which only logs and dies)."""
    import signal

    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def check_out_folder(out: Path, what: str = "the outputs") -> None:
    """Refuse an --out that exists as a file, before any work (a command writes a folder there)."""
    if out.exists() and not out.is_dir():
        fail(f"--out '{out}' is a file: pass a folder for {what}")


def open_store(path: Path):
    """The store at `path`, or a one-line error naming what is wrong with it."""
    from sharding.store import Store

    try:
        return Store(path)
    except ValueError as err:
        fail(str(err))


def here_or_on_ray(
    on_ray: bool, ray_config: Any, what: str, run: Callable[[Any], T], cluster: Callable[[], Any]
) -> T:
    """`run(None)` in this process, or with `on_ray`, `run(cluster())` in a Ray session
    (`ray_config`'s cluster or RAY_ADDRESS, else an embedded local Ray), saying where on stderr:
    the one shape of `ingest`, `export sa1b` and `quality` with `--ray` / `--address`."""
    if not on_ray:
        return run(None)
    from stages.cluster import ray_session

    with ray_session(ray_config) as where:
        typer.echo(f"{what} on {where}", err=True)
        return run(cluster())


def files_under(
    folder: Path, out: Path | None = None, unreadable: list[tuple[Path, str]] | None = None
) -> list[Path]:
    """Every file under `folder` (recursive, into symbolic links to folders, each real folder
    once), sorted; hidden files and folders, and anything inside `out` (a command's output
    folder placed in its input), left out: a re-run must not take the last run's outputs for
    inputs. A broken symbolic link is listed (reading it fails with its reason, which the
    command records); a folder that cannot be listed goes to `unreadable` (path, error).
    (`ingest` lists a folder the same way: `sharding.sources`.)"""
    import os

    def cannot_list(exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(exc.filename or folder), f"{type(exc).__name__}: {exc.strerror or exc}"))

    out_resolved = out.resolve() if out is not None else None
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True, onerror=cannot_list):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / n for n in names if not n.startswith(".")]
    files = []
    for path in sorted(found):
        if not (path.is_file() or (path.is_symlink() and not path.exists())):
            continue
        if out_resolved is not None and (
            out_resolved == path.resolve() or out_resolved in path.resolve().parents
        ):
            continue
        files.append(path)
    return files


def require_weights(model: str, checkpoint: object, random_weights: bool | None = None) -> None:
    """Fail unless the model has weights: a --checkpoint, or a registry entry that ships its own
    (the bundled "default"). random_weights: the command's --random-weights flag, if it has one."""
    from engine.model import resolve_config
    from engine.model_config import PACKAGED_CHECKPOINTS

    try:
        resolve_config(model)  # an unknown name is named as such, not as a model without weights
    except ValueError as err:
        fail(str(err))
    if checkpoint is not None or random_weights or str(model) in PACKAGED_CHECKPOINTS:
        return
    untrained = "; --random-weights runs an untrained model" if random_weights is not None else ""
    fail(
        f"model '{model}' has no bundled weights: --checkpoint is required (e.g. "
        f"sam_vit_b_01ec64.pth), or use --model default (the bundled model){untrained}"
    )


def model_sets(
    sets: list[str] | None,
    model: str | None,
    checkpoint: Path | None,
    device: Any = None,
    bf16: bool | None = None,
    store: Path | None = None,
    round_: int | None = None,
) -> list[str]:
    """`--set` overrides plus the model flags as `model.*` keys (absolute paths: actors on other
    nodes, or in another working directory, open the same files). device: a `Device` (enum).

    With `store` and `round_` (a gear's `--round N`) and no model named by flag or `--set`, the
    model is the store's model round N (`STORE/models/round-N/`, written by `sa-engine train`):
    gear round N runs on model round N. Round 0 is the config's model (the bundled default)."""
    import json

    from engine.model_config import MODEL_REGISTRY

    out = list(sets or [])
    named = model or checkpoint or any(
        s.startswith(("model.model=", "model.checkpoint=")) for s in out
    )
    if store is not None and round_ and not named:
        from engine.training.registry import ModelRegistry

        try:
            files = ModelRegistry(store).files(round_)
        except ValueError as exc:
            fail(f"--round {round_}: {exc}, or name the model with --model/--checkpoint")
        typer.echo(f"model: round {round_} of {files.card.parent}")
        warning = ModelRegistry(store).gate_warning(round_)
        if warning:  # --round names it, so it runs; the person is told
            typer.echo(f"warning: {warning}; it runs because --round {round_} names it", err=True)
        model, checkpoint = str(files.card), files.checkpoint
    if model:
        if model not in MODEL_REGISTRY and Path(model).is_file():
            model = str(Path(model).resolve())
        out.append(f"model.model={json.dumps(model)}")
    if checkpoint is not None:
        if not checkpoint.is_file():
            fail(f"--checkpoint {checkpoint} does not exist: pass a SAM state dict (.pth)")
        out.append(f"model.checkpoint={json.dumps(str(checkpoint.resolve()))}")
    if device is not None:
        out.append(f"model.device={getattr(device, 'value', device)}")
    if bf16:
        out.append("model.bf16=true")
    return out


def model_config(cfg: dict, random_weights: bool | None = None):
    """The config's `model:` block (`ModelConfig`), refused when it has no weights."""
    from engine.cli.config import section
    from engine.model_config import ModelConfig

    try:
        model = section(cfg, "model", ModelConfig)
    except ValueError as exc:
        fail(str(exc))
    model = model_of_checkpoint(model)
    require_weights(model.model, model.checkpoint, random_weights)
    return model


def model_of_checkpoint(model):
    """A checkpoint given with the config's bundled model ("default": no --model named) runs
    the architecture it fits: `--checkpoint sam_vit_h_4b8939.pth` alone means vit_h. A named
    model is left as named (a mismatch is then reported when it loads)."""
    import dataclasses

    from engine.model_config import PACKAGED_CHECKPOINTS

    if model.checkpoint is None or model.model not in PACKAGED_CHECKPOINTS:
        return model
    from engine.model import fitting_variant

    try:
        name = fitting_variant(Path(model.checkpoint).expanduser())
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if name is None or name == model.model:
        return model  # (one that fits nothing is refused, with its shapes, as it loads)
    typer.echo(f"model: {name}, the architecture {model.checkpoint} fits", err=True)
    return dataclasses.replace(model, model=name)
