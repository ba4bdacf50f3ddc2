"""Gear 2 on Ray: `engine.gears.semi.SemiAnnotation` in model actors.

The detector is trained (or found) once on the driver before the pipeline
(`engine.gears.semi.load_or_train`: gear-1 masks on the stored embeddings) and saved in the
store; each actor loads the model, the references and that detector file once, then per image
prefills from the detector's boxes and lets the simulated annotator add what is missing. New
embeddings are stored with the shard by the driver, as in gear 1 (`stages.assisted.commit_gear`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from engine.gears import SEMI_STAGE, gear_facts
from sharding.store import Store
from stages.assisted import commit_gear
from stages.auto import check_checkpoint
from stages.steps import StageSpec


def make_semi(
    model: Any, annotate: Any, semi: Any, references: str, detector: str, round_: int, root: str
):
    """The per-image function of one actor: `SemiAnnotation` with the detector saved at
    `detector` (checked against this model's encoder)."""
    from pathlib import Path

    from engine.gears.embeddings import load_predictor
    from engine.gears.semi import SemiAnnotation, load_or_train
    from engine.references import ReferenceSet

    store, predictor = Store(root), load_predictor(model)
    trained = load_or_train(store, predictor, semi, round_, Path(detector))
    return SemiAnnotation(
        store, predictor, ReferenceSet.load(references), annotate, trained, semi
    )


def semi_spec(
    model: Any,
    annotate: Any,
    semi: Any,
    references: str,
    detector: str,
    trained_on: dict[str, Any],
    round_: int,
    root: str,
) -> tuple[StageSpec, dict[str, Any]]:
    """Gear 2 and the facts its run record keeps.

    Arguments:
      model (ModelConfig), annotate (AnnotatorConfig), semi (SemiConfig): the config blocks.
      references (str): COCO file every node can read.
      detector (str): the trained detector file (`load_or_train`'s), every node can read.
      trained_on (dict): that detector's training facts (kept in each completion record).
      round_ (int): the model round. root (str): the store.
    """
    from engine.gears.semi import semi_meta

    check_checkpoint(model)
    kwargs = {
        "model": model,
        "annotate": annotate,
        "semi": semi,
        "references": references,
        "detector": detector,
        "round_": round_,
        "root": root,
    }
    meta = partial(semi_meta, annotate, references, detector=trained_on, semi=semi)
    spec = StageSpec(
        SEMI_STAGE, make_semi, kwargs, commit=partial(commit_gear, meta=meta), shared_with_people=True
    )
    used = {"path": detector, "trained_on": trained_on}
    return spec, gear_facts(model, annotate, references, semi=semi, detector=used)
