"""`RayConfig`: the `ray:` config block (where a stage runs and what each step asks Ray for)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.checks import invalid


@dataclass
class RayConfig:
    """Where the stages run and the resources each pipeline step asks for.

    address: a cluster to join ("auto", "HOST:PORT", "ray://HOST:10001"); None: `RAY_ADDRESS` if
      set, else an embedded local Ray bound to 127.0.0.1 that lives as long as the command.
    num_cpus: logical CPUs of the embedded local Ray (None: the machine's); ignored on clusters.
    object_store_mb: object store of the embedded local Ray, MiB (None: sized to the store's
      largest images, `stages.steps.object_store_mb`; Ray's own default, 30% of the memory,
      lets a long run's shared memory grow that far). Ignored on clusters (`ray start
      --object-store-memory`).
    model_actors: size of the model-actor pool (None: one per GPU; on CPU-only clusters one per
      `cpus_per_actor` CPUs of the whole cluster).
    gpus_per_actor: GPUs each model actor holds where the cluster has GPUs.
    cpus_per_actor: CPU share (= torch threads) of one model actor on CPU-only clusters; actors
      reserve a little less so the read/decode tasks always find a CPU (no 2-CPU deadlock).
    io_cpus: CPUs of the cluster kept free of model actors for reading, decoding and
      post-processing tasks.
    batch_size: images per model-actor call (Ray requires it explicit with GPUs).
    decode_cpus / post_cpus: CPUs each decode / post-processing task reserves.
    read_tasks: shards read at the same time (None: one per model actor, at least 2); bounds
      how many partly processed shards the driver holds.
    idle_workers: idle task workers the embedded local Ray keeps for the next task (Ray's
      `num_workers_soft_limit`; None: Ray's own rule); on a cluster set
      `RAY_num_workers_soft_limit` when starting each node.
    block_images: images per Ray block after reading, the unit Ray hands a model actor: small
      blocks keep every actor busy to the end of a run; Ray bundles blocks up to `batch_size`.
    max_attempts: pipeline attempts over the shards still unfinished after a failure (a lost
      node, a crashed actor); images already received are not processed again.
    progress: show the stage's progress bar (shards, images, masks/s) on stderr.
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_mb: int | None = None
    model_actors: int | None = None
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    io_cpus: float = 0.5
    batch_size: int = 1
    decode_cpus: float = 0.25
    post_cpus: float = 0.25
    read_tasks: int | None = None
    block_images: int = 4
    idle_workers: int | None = 4
    max_attempts: int = 3
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("gpus_per_actor", "cpus_per_actor", "decode_cpus", "post_cpus"):
            if not getattr(self, name) > 0:
                raise invalid(f"ray.{name}", getattr(self, name), "a value > 0")
        if self.io_cpus < 0:
            raise invalid("ray.io_cpus", self.io_cpus, "a value >= 0")
        for name in ("num_cpus", "model_actors", "read_tasks", "object_store_mb", "block_images",
                     "idle_workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise invalid(f"ray.{name}", value, "a positive integer or null")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise invalid("ray.batch_size", self.batch_size, "an integer >= 1")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise invalid("ray.max_attempts", self.max_attempts, "a whole number >= 1")
