"""Stand-in stage factories for the Ray pipeline tests (importable by Ray workers: the tests put
this folder on PYTHONPATH before Ray starts)."""

from __future__ import annotations

from engine.classical import classical_masks
from sharding.runner import StageResult


def make_failing(bad_ids: list[int]):
    """Classical masks, but the stage raises on the images in `bad_ids` (a broken stage input)."""

    def process(row, rgb):
        if row.image_id in bad_ids:
            raise RuntimeError(f"cannot segment image {row.image_id}")
        return StageResult(masks=classical_masks(rgb))

    return process


def make_raw():
    """The model half of a split stage: returns the masks as plain dicts (the actor's output)."""

    def process(row, rgb):
        return [m.to_json() for m in classical_masks(rgb)]

    return process


def finish_raw(row, raw):
    """The CPU half: plain dicts -> StageResult; raises on an empty result to test that path."""
    from engine.records import MaskRecord

    if row.image_id == 2:
        raise ValueError("post-processing failed on image 2")
    return StageResult(masks=[MaskRecord.from_json(r) for r in raw])
