"""Training on a Ray cluster with Ray Train: how many workers, what each one asks for, and the
`TorchTrainer` that runs the training loop (`trainer.train`, unchanged) on every worker.

Each worker builds the model and reads the training images itself (the store is shared storage),
trains its rank's slice with the others (`collective.py` averages the gradients), and rank 0 alone
calls the job's `finish` (which writes the model round); its return value comes back to the driver.
Ray is imported only here, and only when a cluster is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from engine.checks import invalid
from engine.modeling import Sam
from engine.training.trainer import TrainConfig, TrainItem, TrainResult, train


@dataclass
class WorkerConfig:
    """The cluster keys of the `train:` block (they apply only with `--address`).

    Attributes:
      workers (int | None): Ray Train workers. None: one per GPU of the cluster; on a cluster
        without GPUs, one per node.
      cpus_per_worker (float): CPUs each worker reserves on a cluster without GPUs; its torch
        threads are the whole part of it (at least 1).
    """

    workers: int | None = None
    cpus_per_worker: float = 1.0

    def validate(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise invalid("train.workers", self.workers, "an integer >= 1 or null")
        if not isinstance(self.cpus_per_worker, (int, float)) or not self.cpus_per_worker > 0:
            raise invalid("train.cpus_per_worker", self.cpus_per_worker, "a value > 0")


@dataclass(frozen=True)
class WorkerPlan:
    """workers: Ray Train workers; use_gpu: one GPU each; resources_per_worker: what one worker
    reserves; threads: torch threads in a worker; backend: torch.distributed backend."""

    workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    threads: int = 1
    backend: str = "gloo"

    def describe(self) -> str:
        each = ", ".join(f"{v:g} {k}" for k, v in self.resources_per_worker.items())
        return f"{self.workers} Ray Train worker(s), each {each}, {self.threads} torch thread(s), {self.backend}"


def plan_workers(nodes: Sequence[dict[str, float]], config: WorkerConfig) -> WorkerPlan:
    """Size the worker group from the resources of the cluster's live nodes.

    With GPUs: one worker per GPU (`nccl`), each reserving one GPU. Without: one worker per node
    (`gloo`), each reserving `cpus_per_worker` CPUs. A count that the nodes cannot hold is refused
    here, since Ray Train would wait for it forever.

    Arguments:
      nodes (Sequence[dict[str, float]]): resources of each live node ("CPU", "GPU", ...), as
        `ray.nodes()[i]["Resources"]`.
      config (WorkerConfig): the cluster keys of the `train:` block.
    Returns:
      (WorkerPlan)
    """
    config.validate()
    gpus = [math.floor(n.get("GPU", 0.0)) for n in nodes]
    threads = max(1, math.floor(config.cpus_per_worker))
    if sum(gpus) > 0:
        workers = config.workers or sum(gpus)
        if workers > sum(gpus):
            raise ValueError(
                f"train.workers={workers}: the cluster has {sum(gpus)} GPU(s) and each worker takes one; "
                "lower train.workers"
            )
        return WorkerPlan(workers, True, {"GPU": 1.0}, threads, "nccl")
    cpus = float(config.cpus_per_worker)
    fits = [math.floor(n.get("CPU", 0.0) / cpus + 1e-9) for n in nodes]
    workers = config.workers or sum(1 for f in fits if f >= 1)
    if workers < 1 or workers > sum(fits):
        node_cpus = [round(n.get("CPU", 0.0), 2) for n in nodes]
        raise ValueError(
            f"{workers or 'no'} worker(s) of {cpus:g} CPU(s) do not fit the cluster (CPUs per node: "
            f"{node_cpus}, room for {sum(fits)}): Ray Train would wait for them forever; lower "
            "train.workers or train.cpus_per_worker"
        )
    return WorkerPlan(workers, False, {"CPU": cpus}, threads, "gloo")


class TrainJob(Protocol):
    """What every worker runs: build the model, read the images, train, and (rank 0) finish.
    It is sent to the workers, so it must pickle (cloudpickle)."""

    config: TrainConfig

    def model(self) -> Sam: ...

    def items(self) -> list[TrainItem]: ...

    def finish(self, sam: Sam, result: TrainResult, how: dict[str, Any]) -> Any: ...


def train_on_ray(
    job: TrainJob,
    plan: WorkerPlan,
    storage_path: str,
    name: str,
    address: str | None = None,
    threads: int | None = None,
) -> Any:
    """Train on `plan.workers` Ray Train workers of the Ray this process is connected to.

    Arguments:
      job (TrainJob): the model, the items, the recipe and what rank 0 does at the end.
      plan (WorkerPlan): from `plan_workers`.
      storage_path (str): Ray Train's run folder (shared storage on a cluster).
      name (str): the run's name under `storage_path`.
      address (str | None): the cluster's address, for the record `finish` gets.
      threads (int | None): torch threads per worker (None: `plan.threads`).
    Returns:
      what `job.finish` returned on rank 0.
    Raises:
      ValueError: a worker refused the data or the recipe (its message).
      RuntimeError: training failed otherwise (a worker died, Ray failed).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    how = {
        "workers": plan.workers,
        "backend": plan.backend,
        "address": address,
        "use_gpu": plan.use_gpu,
        "resources_per_worker": dict(plan.resources_per_worker),
        "ray": ray.__version__,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "threads": threads or plan.threads, "how": how},
        torch_config=TorchConfig(backend=plan.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=dict(plan.resources_per_worker),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        refused = _refusal(exc)
        if refused is not None:
            raise refused from None
        raise RuntimeError(f"distributed training failed: {exc}") from exc
    return result.return_value


def _worker_loop(config: dict[str, Any]) -> Any:
    """One Ray Train worker: the model on this worker's device, `trainer.train`, rank 0 finishes."""
    import ray.train
    from ray.train.torch import prepare_model

    torch.set_num_threads(config["threads"])
    job: TrainJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    # Device placement only: gradients are averaged by trainer.train (collective.py says why not DDP).
    sam = prepare_model(job.model(), parallel_strategy=None)
    result = train(sam, job.items(), job.config, log=_stdout if rank == 0 else _silent)
    if rank != 0:
        return None
    device = str(next(sam.parameters()).device)
    how = {**config["how"], "workers": result.workers, "device": device, "threads": torch.get_num_threads()}
    return job.finish(sam, result, how)


def _stdout(line: str) -> None:
    """Rank 0's progress, to the driver's console (Ray forwards worker output). Not print():
    Ray Train patches it in workers, and a patched print shows every line twice there."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _silent(line: str) -> None:
    pass


def _refusal(exc: BaseException) -> ValueError | None:
    """The ValueError a worker raised (data or recipe refused), if that is why training failed."""
    failures = getattr(exc, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        cause: BaseException | None = failure
        for _ in range(8):  # Ray wraps the worker's exception (with its traceback) once or twice
            if cause is None or isinstance(cause, ValueError):
                break
            cause = getattr(cause, "_base_exc", None) or getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, ValueError):
            return ValueError(str(cause))
    return None
