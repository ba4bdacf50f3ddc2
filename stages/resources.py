"""How big the model-actor pool is and what each actor asks for, from the cluster's resources."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.config import RayConfig


@dataclass(frozen=True)
class ActorPlan:
    """actors: pool size; num_cpus / num_gpus: what one actor reserves; threads: torch threads
    inside one actor (its CPU share); batch_size: images per actor call; read_tasks: shards
    read at once; read_cpus / decode_cpus / post_cpus: what one read / decode /
    post-processing task reserves; block_images: images per block after reading."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    batch_size: int
    read_tasks: int
    read_cpus: float
    decode_cpus: float
    post_cpus: float
    block_images: int

    def describe(self) -> str:
        where = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:.2f} CPU"
        return (
            f"{self.actors} model actor(s), each {where}, {self.threads} torch thread(s), "
            f"batch {self.batch_size}"
        )


def plan_actors(
    resources: dict[str, float],
    config: RayConfig,
    uses_model: bool = True,
    node_cpus: list[float] | None = None,
) -> ActorPlan:
    """Size the model-actor pool from the cluster's resources (`ray.cluster_resources()`).

    With GPUs: one actor per `gpus_per_actor` GPUs. CPU-only: one actor per `cpus_per_actor`
    CPUs, each reserving at most `(node CPUs - io_cpus) / (actors on that node)` on every node,
    so `io_cpus` stay free for the read and decode tasks on each node, also after other nodes
    are lost (a pool holding every CPU starves the reads: measured deadlock on 2 CPUs). A stage
    without a model (`uses_model=False`) never asks for GPUs.

    Arguments:
      resources (dict[str, float]): the cluster's totals, at least "CPU"; "GPU" where present.
      config (RayConfig): the `ray:` block.
      uses_model (bool): False: no GPUs are asked for.
      node_cpus (list[float] | None): CPUs of each live node (None: one node with all CPUs).
    Returns:
      (ActorPlan)
    """
    cpus = float(resources.get("CPU", 0.0))
    gpus = float(resources.get("GPU", 0.0)) if uses_model else 0.0
    if gpus >= config.gpus_per_actor:
        actors = config.model_actors or max(1, math.floor(gpus / config.gpus_per_actor))
        num_gpus = config.gpus_per_actor
        num_cpus = min(config.cpus_per_actor, max((cpus - config.io_cpus) / actors, 0.1))
        threads = max(1, math.floor(config.cpus_per_actor))
    else:
        free = cpus - config.io_cpus
        if free <= 0 or cpus < config.decode_cpus:
            raise ValueError(
                f"the cluster has {cpus:g} CPUs: with ray.io_cpus={config.io_cpus:g} none is left "
                "for model actors; lower ray.io_cpus or add CPUs (ray.num_cpus for a local run)"
            )
        actors = config.model_actors or max(1, math.floor(cpus / config.cpus_per_actor))
        num_gpus = 0.0
        num_cpus = min(config.cpus_per_actor, free / actors)
        for node in node_cpus or []:
            if node - config.io_cpus > 0:
                per_node = max(1, min(actors, math.floor(node / config.cpus_per_actor)))
                num_cpus = min(num_cpus, (node - config.io_cpus) / per_node)
        threads = max(1, round(min(config.cpus_per_actor, cpus / actors)))
    read_tasks = config.read_tasks or max(2, actors)
    return ActorPlan(
        actors,
        round(num_cpus, 4),
        num_gpus,
        threads,
        config.batch_size,
        read_tasks,
        read_cpus=config.decode_cpus,
        decode_cpus=config.decode_cpus,
        post_cpus=config.post_cpus,
        block_images=config.block_images,
    )
