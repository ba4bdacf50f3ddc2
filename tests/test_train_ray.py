"""`sa-engine train --address` for real: a local Ray cluster on loopback, two CPU Ray Train workers
(gloo) training a tiny model on a store of real COCO photos with their person masks. The round
rank 0 writes is the round of one process fed both workers' images every step (their gradients
averaged), not what either worker would have trained alone; `evaluate` scores it like any round."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine import rle
from engine.cli.main import app
from engine.model import build_sam
from engine.records import MaskRecord
from engine.references import ReferenceSet
from engine.training import trainer as T
from engine.training.cluster import WorkerConfig, plan_workers
from engine.training.data import store_items
from engine.training.registry import ModelRegistry
from ray_cluster import ROOT, LocalCluster, node_env
from sharding import StageResult, Store, run_stage
from store_helpers import person_photo_store
from tests.test_training import TINY

RECIPE = dict(
    steps=6, masks_per_image=2, rounds=3, rounds_without_point=1, warmup_steps=1, lr=1e-2,
    image_sizes=[256], log_every=2,
)  # fmt: skip


@pytest.fixture()
def cluster():
    c = LocalCluster()
    try:
        c.start_node("head", num_cpus=2, head=True)
        yield c
    finally:
        c.stop()


def _store(tmp_path, shared_data_dir) -> Store:
    """4 COCO photos in 2 shards; their person masks stand in for gear 1's accepted masks (stage
    `assisted`, round 0); model round 0 is the tiny model."""
    coco = shared_data_dir / "annotations" / "coco_persons_keypoints.json"
    if not coco.is_file():
        pytest.skip(f"{coco} is absent")
    refs = ReferenceSet.load(coco)
    store, _ = person_photo_store(tmp_path, refs, shared_data_dir / "images", 4, 3)

    def references(row, rgb):
        masks = [
            MaskRecord(0, r.segmentation, rle.bbox_xywh([r.segmentation])[0].tolist(), r.area, 1.0,
                       1.0, [0, 0, row.width, row.height], [])  # fmt: skip
            for r in refs.match(row.source).references
        ]
        return StageResult(masks=masks)

    run_stage(store, "assisted", 0, references)
    torch.manual_seed(0)
    ModelRegistry(store.root).write_round(0, build_sam(TINY), {"note": "tiny, untrained"})
    return store


def _one_process(store: Store, config: T.TrainConfig, ranks: list[int], world: int) -> dict:
    """The recipe in one process, written out from the trainer's parts: every step, each rank in
    `ranks` draws an image of its slice (items[rank::world]) and prompts from its own stream
    (seed + rank); their gradients are averaged, then clipped, then one AdamW step."""
    sam = ModelRegistry(store.root).load(0)
    items, _ = store_items(store.root, ["assisted"], 0, "train", 0.0)
    params = T._trainable(sam, config)
    mode = T._cacheable(sam, config)
    sam.eval()
    shards = [T.encode_items(sam, items, config, lambda s: None, r, world)[0] for r in ranks]
    rngs = [np.random.default_rng(config.seed + r) for r in ranks]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sam.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = T.lr_at(step, config)
        sums: list[torch.Tensor | None] = [None] * len(params)
        for shard, rng in zip(shards, rngs):
            item = shard[int(rng.integers(len(shard)))]
            T.set_resolution(sam, item.size)
            optimizer.zero_grad(set_to_none=True)
            T._simulate(sam, item, mode, config, rng)
            for i, p in enumerate(params):
                if p.grad is not None:
                    sums[i] = p.grad.clone() if sums[i] is None else sums[i] + p.grad
        for p, total in zip(params, sums):
            p.grad = None if total is None else total / len(ranks)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
    T.set_resolution(sam, TINY.image_size)
    return {k: v.detach().clone() for k, v in sam.state_dict().items()}


def test_worker_plan_fits_the_cluster_or_says_why():
    gpus = plan_workers([{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}], WorkerConfig())
    assert (gpus.workers, gpus.use_gpu, gpus.backend, gpus.resources_per_worker) == (8, True, "nccl", {"GPU": 1.0})
    cpus = plan_workers([{"CPU": 2}, {"CPU": 2}], WorkerConfig())  # one per node
    assert (cpus.workers, cpus.use_gpu, cpus.backend, cpus.threads) == (2, False, "gloo", 1)
    assert cpus.resources_per_worker == {"CPU": 1.0}
    assert plan_workers([{"CPU": 2}], WorkerConfig(workers=2)).workers == 2
    assert plan_workers([{"CPU": 8}], WorkerConfig(cpus_per_worker=4)).threads == 4
    with pytest.raises(ValueError, match="do not fit"):  # Ray Train would wait forever
        plan_workers([{"CPU": 2}], WorkerConfig(workers=3))
    with pytest.raises(ValueError, match="do not fit"):  # 3 CPUs in all, but no node holds 2
        plan_workers([{"CPU": 1.5}, {"CPU": 1.5}], WorkerConfig(cpus_per_worker=2))
    with pytest.raises(ValueError, match="1 GPU"):
        plan_workers([{"CPU": 8, "GPU": 1}], WorkerConfig(workers=2))
    with pytest.raises(ValueError, match="train.workers=0 is invalid"):
        WorkerConfig(workers=0).validate()


def test_a_workers_refusal_reaches_the_driver_as_its_message():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from engine.training.cluster import _refusal

    refused = UserExceptionWithTraceback(ValueError("no usable training images"), "traceback")
    crashed = UserExceptionWithTraceback(RuntimeError("segfault"), "traceback")
    assert str(_refusal(WorkerGroupError("failed", {0: crashed, 1: refused}))) == "no usable training images"
    assert _refusal(WorkerGroupError("failed", {0: crashed})) is None


def _distance(a: dict, b: dict, keys: list[str]) -> float:
    return float(sum((a[k].float() - b[k].float()).norm() ** 2 for k in keys) ** 0.5)


@pytest.mark.slow
def test_train_on_two_ray_workers_is_one_model_trained_on_both_shards(tmp_path, shared_data_dir, cluster):
    store = _store(tmp_path, shared_data_dir)
    sets = [arg for k, v in RECIPE.items() for arg in ("--set", f"train.{k}={v}")]
    cmd = [sys.executable, "-m", "engine.cli", "train", str(store.root), "--from", "assisted"]
    cmd += ["--round", "0", "--held-out-share", "0", "--address", cluster.address]
    cmd += ["--set", "train.workers=2", *sets]
    started = time.monotonic()
    done = subprocess.run(cmd, env=node_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "2 Ray Train worker(s), each 1 CPU" in output and "wrote model round 1" in output
    seconds = time.monotonic() - started

    registry = ModelRegistry(store.root)
    assert registry.rounds() == [0, 1] and registry.current() == 0
    card = registry.card(1)
    assert card["parent_round"] == 0 and card["started_from"] == "round-0"
    assert card["distributed"]["workers"] == 2 and card["distributed"]["backend"] == "gloo"
    assert card["distributed"]["address"] == cluster.address and card["training"]["workers"] == 2
    assert f"--address {cluster.address}" in card["command"]
    assert card["training"]["images"] == 4 and card["training"]["steps"] == RECIPE["steps"]
    trained = registry.load(1)  # rebuilt from the card, strict load of the fp16 checkpoint
    state = {k: v.float() for k, v in trained.state_dict().items()}

    # Synchronised, not independent: the weights are those of one process fed both shards.
    config = T.TrainConfig(**RECIPE)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        both = _one_process(store, config, ranks=[0, 1], world=2)
        alone = _one_process(store, config, ranks=[0], world=2)  # worker 0 on its own
    finally:
        torch.set_num_threads(before)
    start = registry.load(0).state_dict()
    learnt = [k for k in both if k.startswith(("mask_decoder", "prompt_encoder", "image_encoder.neck"))]
    learnt = [k for k in learnt if both[k].is_floating_point() and not torch.equal(both[k], start[k])]
    assert learnt, "the reference run changed no weight"
    both_half = {k: v.half().float() for k, v in both.items()}
    moved = _distance(both, start, learnt)
    off_both, off_alone = _distance(state, both_half, learnt) / moved, _distance(state, alone, learnt) / moved
    assert off_both < 1e-3, f"not the weights of both shards together ({off_both:.2e} of the update)"
    assert off_alone > 0.05, f"the check cannot tell the runs apart ({off_alone:.2e})"

    # The round is a round like any other: the gate scores it.
    result = CliRunner().invoke(
        app,
        ["evaluate", str(store.root), "--candidate", "1", "--against", "none", "--from", "assisted",
         "--split", "all", "--no-promote", "--threads", "1", "--set", "train.gate.max_masks=4",
         "--set", "train.gate.max_clicks=5"],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert registry.card(1)["evaluations"][0]["scores"]["1"]["masks"] > 0
    print(f"train on 2 Ray workers: {seconds:.1f} s; off both {off_both:.1e}, off worker 0 alone "
          f"{off_alone:.2f} (of the update);", json.dumps(card["distributed"]))
