"""Joining a Ray cluster, or starting an embedded local one bound to loopback only."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator

from stages.config import RayConfig

if TYPE_CHECKING:
    from sharding.store import Store

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def resolve_address(config: RayConfig) -> str | None:
    """The cluster to join: `ray.address`, else `RAY_ADDRESS`, else None (embedded local Ray)."""
    return config.address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(config: RayConfig, store: "Store | None" = None) -> Iterator[str]:
    """Connect to Ray for the duration of a command; yields a description of where it runs.

    Joining (`address` or `RAY_ADDRESS`) leaves the cluster running afterwards. Otherwise an
    embedded Ray starts with `address="local"` (a stale `ray_current_cluster` file of a dead
    cluster cannot make it hang) and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which makes Ray
    advertise and listen on 127.0.0.1 only; it stops when the command ends. Its object store is
    `ray.object_store_mb`, else sized to `store`'s images (`stages.steps.object_store_mb`), else
    Ray's default. A Ray already initialised in this process (tests, notebooks) is used as it is.
    """
    address = resolve_address(config)
    if not address:
        local_only()
    import ray

    if ray.is_initialized():
        yield f"the Ray already running in this process ({_nodes()} node(s))"
        return
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=False)
        where = f"cluster {address} ({_nodes()} node(s))"
    else:
        store_mb = config.object_store_mb
        if store_mb is None and store is not None:
            from stages.steps import object_store_mb

            store_mb = object_store_mb(store, config)
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            object_store_memory=store_mb and store_mb * 2**20,
            include_dashboard=False,
            log_to_driver=False,
            # Ray keeps as many idle task workers as CPUs are unreserved: none once the model
            # actors hold fractional CPUs, so each read/decode/post task worker was killed after
            # 1 s idle and restarted, torch imports and all (17 worker starts for 20 images).
            _system_config=(
                {} if config.idle_workers is None else {"num_workers_soft_limit": config.idle_workers}
            ),
        )
        where = "an embedded local Ray on 127.0.0.1" + (
            f" (object store {store_mb} MiB)" if store_mb else ""
        )
    try:
        yield where
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raises ValueError, naming the address and the fix, when a HOST:PORT (or ray://HOST:PORT)
    cluster address takes no connection: `ray.init` would retry it for minutes before failing.
    "auto" and other forms are left to Ray."""
    import socket

    where = address.removeprefix("ray://")
    host, sep, port = where.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(
            f"no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}): start "
            "one there (`ray start --head --port PORT` on the head node), or fix --address / "
            "ray.address / RAY_ADDRESS (unset them for an embedded local Ray)"
        ) from None


def local_only() -> None:
    """Keep the Ray this process starts on 127.0.0.1: the variable is read by every Ray process
    it starts, and by `ray` itself when first imported (if it already was, its constant is set
    to the same value, which is what the variable would have done)."""
    import sys

    os.environ[LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def quiet_and_ordered() -> None:
    """Ray Data hands rows back in their input order (the ingest's ids follow the listing, the
    export's lists the shards) and draws none of its own progress bars (the command has its own)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False


def shard_rows(
    shards: list[str], fn: Any, fn_kwargs: dict[str, Any], cpus: float
) -> Iterator[dict[str, Any]]:
    """`fn({"shard": s}, **fn_kwargs)` as one Ray Data task per shard (`cpus` CPUs each) on the
    Ray this process is connected to; yields the rows it returns, in shard order, each as soon
    as it and those before it are done. A row says its failure in "error" (text: the task's own
    exception would come back as Ray's traceback)."""
    import ray

    if not shards:
        return
    quiet_and_ordered()
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    yield from ds.map(fn, fn_kwargs=fn_kwargs, num_cpus=cpus).iter_rows()


def shard_tasks(
    shards: list[str], fn: Any, fn_kwargs: dict[str, Any], cpus: float
) -> Iterator[dict[str, Any]]:
    """`shard_rows`, stopped at the first row with an "error" (raised as ValueError)."""
    for row in shard_rows(shards, fn, fn_kwargs, cpus):
        if row["error"]:
            raise ValueError(row["error"])
        yield row


def _nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
