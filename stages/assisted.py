"""Gear 1 on Ray: the simulated annotator of `engine.gears.assisted` in model actors.

Each actor loads the model and the references once; per image it sets the predictor from the
image's stored embedding or encodes the image (on the actor's GPU when there is one), then clicks
the image's references. New embeddings travel to the driver with the image's outcome
(`StageResult.extra`) and are stored with the shard (`embeddings.keep_embedded`) just before the
shard's output and completion record are committed, so both are written once, by the driver.
With `--annotator none` the actors only encode (`embeddings_spec`): the embeddings are stored and
no stage output is written, ready for people in `sa-engine serve`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import numpy as np

from engine.gears import ASSISTED_STAGE, gear_facts
from engine.model_config import model_facts
from sharding.runner import StageResult
from sharding.store import ImageRow, ShardOutput, Store
from stages.auto import check_checkpoint
from stages.steps import StageSpec

EMBEDDINGS_STAGE = "embeddings"  # run records of `--annotator none` (it writes no stage output)


def make_assisted(model: Any, annotate: Any, references: str, root: str):
    """The per-image function of one actor: `AssistedAnnotation` over this model and references.

    Arguments:
      model (ModelConfig): the `model:` block. annotate (AnnotatorConfig): the `annotate:` block.
      references (str): the COCO reference file. root (str): the store.
    """
    from engine.gears.assisted import AssistedAnnotation
    from engine.gears.embeddings import load_predictor
    from engine.references import ReferenceSet

    return AssistedAnnotation(
        Store(root), load_predictor(model), ReferenceSet.load(references), annotate
    )


def commit_gear(
    store: Store,
    stage: str,
    round_: int,
    shard: str,
    output: ShardOutput,
    extras: Any,
    *,
    meta: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """The driver's shard step of gears 1 and 2: store the shard's new embeddings, then commit
    its output with `meta(images, embedded)` as the completion record's meta (`shard_meta`,
    `semi_meta`). `extras`: (image_id, ImageFacts or None) in image_id order."""
    from engine.gears.embeddings import keep_embedded

    facts = []

    def embedded():
        for image_id, item in extras:
            if item is None:
                facts.append((image_id, None))
                yield image_id, None
                continue
            new = item.embedded
            facts.append((image_id, dataclasses.replace(item, embedded=None)))  # bytes not kept
            yield image_id, new

    report = keep_embedded(store, shard, embedded())
    output.meta = meta(facts, report)
    return store.write_shard_output(stage, round_, shard, output)


def assisted_spec(
    model: Any, annotate: Any, references: str, root: str
) -> tuple[StageSpec, dict[str, Any]]:
    """Gear 1 and the facts its run record keeps.

    Arguments:
      model (ModelConfig): a checkpoint path must exist (checked here, before any actor starts).
      annotate (AnnotatorConfig). references (str): COCO file every node can read.
      root (str): the store (on a cluster: a path every node sees).
    """
    from engine.gears.assisted import shard_meta

    check_checkpoint(model)
    spec = StageSpec(
        ASSISTED_STAGE,
        make_assisted,
        {"model": model, "annotate": annotate, "references": references, "root": root},
        commit=partial(commit_gear, meta=partial(shard_meta, annotate, references)),
        shared_with_people=True,
    )
    return spec, gear_facts(model, annotate, references)


# ---- --annotator none: embeddings only ------------------------------------------------------


def make_embed(model: Any, root: str):
    """The per-image function of one actor that only encodes: (ImageRow, RGB) -> StageResult
    whose `extra` is the `EmbeddedImage`."""
    from engine.gears.embeddings import embed_image, load_predictor

    store, predictor = Store(root), load_predictor(model)

    def process(row: ImageRow, rgb: np.ndarray) -> StageResult:
        return StageResult(extra=embed_image(predictor, store, row.shard, row.image_id, rgb))

    return process


def commit_embeddings(
    store: Store, stage: str, round_: int, shard: str, output: ShardOutput, extras: Any
) -> dict[str, Any]:
    """Store the shard's new embeddings; no stage output. Returns a completion-record-shaped
    summary for the run record (counts, quarantined inputs, meta.embedded)."""
    from engine.gears.embeddings import keep_embedded

    report = keep_embedded(store, shard, extras)
    return {
        "stage": stage,
        "shard": shard,
        "counts": {
            "images": len(output.done),
            "annotations": 0,
            "output_images": 0,
            "quarantined": len(output.quarantined),
        },
        "images": sorted(output.done),
        "quarantined": output.quarantined,
        "meta": {"embedded": dataclasses.asdict(report)},
    }


def unembedded(store: Store, round_: int, fingerprint: str) -> list[str]:
    from engine.gears.embeddings import unembedded_shards

    return unembedded_shards(store, fingerprint)


def embeddings_spec(model: Any, fingerprint: str, root: str) -> tuple[StageSpec, dict[str, Any]]:
    """Encode every image without an embedding by this encoder (`fingerprint`, the model's)."""
    check_checkpoint(model)
    spec = StageSpec(
        EMBEDDINGS_STAGE,
        make_embed,
        {"model": model, "root": root},
        commit=commit_embeddings,
        pending=partial(unembedded, fingerprint=fingerprint),
    )
    return spec, {"model": model_facts(model), "encoder_fingerprint": fingerprint}
