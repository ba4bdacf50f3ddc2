"""The simulated annotator: click placement on hand-made masks, then real SAM runs on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.annotator import (
    AnnotatorConfig,
    SimulatedAnnotator,
    clicks_to_reach,
    farthest_interior_point,
    first_click,
    mask_iou,
    next_click,
)


def disk(h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_first_click_is_the_point_farthest_from_the_boundary():
    ref = disk(60, 80, 30, 25, 12)
    click = first_click(ref)
    assert (click.x, click.y, click.positive) == (30.0, 25.0, True)


def test_image_edge_counts_as_boundary():
    region = np.zeros((20, 40), bool)
    region[:, :30] = True  # touches the left, top and bottom edges
    x, y, dist = farthest_interior_point(region)
    assert dist == pytest.approx(10.0, abs=0.6)
    assert 9 <= y <= 10 and 9 <= x <= 20


def test_next_click_positive_in_a_miss_negative_in_a_spill():
    ref = disk(80, 120, 40, 40, 20)
    half = ref.copy()
    half[:, 40:] = False
    miss = next_click(ref, half)
    assert miss.positive and miss.x > 40 and ref[int(miss.y), int(miss.x)]

    spill = ref.copy()
    spill[10:70, 80:115] = True  # a 60x35 blob outside the object, larger than any miss
    click = next_click(ref, spill)
    assert not click.positive
    # a 35-wide blob: the ridge of points 17 px from its boundary runs down its middle column;
    # ties go to the first in row-major order
    assert click.x == pytest.approx(97, abs=1) and click.y == pytest.approx(27, abs=1)
    assert next_click(ref, ref) is None


def test_largest_error_region_wins_over_a_scattered_one():
    ref = np.zeros((50, 50), bool)
    ref[5:45, 5:45] = True
    pred = ref.copy()
    pred[5:15, 5:45] = False  # a 10x40 miss
    pred[30, 30] = False  # a single-pixel miss
    click = next_click(ref, pred)
    assert click.positive and 5 <= click.y < 15


def test_empty_reference_and_bad_config_are_refused():
    with pytest.raises(ValueError, match="empty"):
        first_click(np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="target_iou"):
        AnnotatorConfig(target_iou=1.5)
    with pytest.raises(ValueError, match="first_choice"):
        AnnotatorConfig(first_choice="best")
    with pytest.raises(ValueError, match="annotate.refine='magic' is invalid: use one of brush, none"):
        AnnotatorConfig(refine="magic")
    assert AnnotatorConfig(max_clicks=20, seconds_per_click=4, time_limit_s=30).click_budget == 7


def test_clicks_to_reach_counts_and_penalises():
    assert clicks_to_reach([0.5, 0.95], 0.9, 20) == 2
    assert clicks_to_reach([0.5, 0.6], 0.9, 20) == 21
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


@pytest.fixture(scope="module")
def fixture_predictor(parity_dir):
    from engine.model import build_sam
    from engine.predictor import SamPredictor

    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    predictor = SamPredictor(sam)
    image = np.asarray(Image.open(parity_dir / "image.png").convert("RGB"))
    predictor.set_image(image)
    return predictor


def test_real_sam_session_follows_the_protocol(fixture_predictor, parity_dir):
    case = np.load(parity_dir / "predict_i_point_multimask.npz")
    references = [case["masks"][0], case["masks"][2]]  # two of the model's own nested masks
    cfg = AnnotatorConfig(target_iou=0.9, max_clicks=6)
    annotator = SimulatedAnnotator(fixture_predictor, cfg)
    traces = annotator.annotate_image(references)
    assert [i for i, _ in traces] == [1, 0]  # larger reference first
    for index, trace in traces:
        ref = references[index]
        assert len(trace.ious) == trace.n_clicks <= cfg.click_budget
        assert trace.clicks[0].positive and ref[int(trace.clicks[0].y), int(trace.clicks[0].x)]
        assert trace.final_iou == pytest.approx(mask_iou(trace.mask, ref))
        assert trace.reached_target or trace.n_clicks == cfg.click_budget
        assert trace.low_res_logits.shape == (1, 256, 256)
        assert trace.seconds == pytest.approx(
            min(clicks_to_reach(trace.ious, 0.9, trace.n_clicks), trace.n_clicks) * 1.5
        )


def test_every_later_click_lands_in_the_error_it_targets(fixture_predictor, parity_dir):
    """Replays a session click by click: each click is placed in the error of the mask before it."""
    ref = np.load(parity_dir / "predict_iii_box.npz")["masks"][0]
    cfg = AnnotatorConfig(target_iou=0.999, max_clicks=4, first_choice="predicted")
    trace = SimulatedAnnotator(fixture_predictor, cfg).annotate(ref)
    assert trace.n_clicks >= 2, "the box mask should not be matched by one click"
    coords, labels, logits = [], [], None
    for k, click in enumerate(trace.clicks):
        if k:
            x, y = int(click.x), int(click.y)
            assert ref[y, x] == click.positive and mask[y, x] != click.positive
        coords.append([click.x, click.y])
        labels.append(click.label)
        masks, scores, low = fixture_predictor.predict(
            np.array(coords), np.array(labels), mask_input=logits, multimask_output=k == 0
        )
        pick = int(np.argmax(scores)) if k == 0 else 0
        mask, logits = masks[pick], low[pick][None]
        assert mask_iou(mask, ref) == pytest.approx(trace.ious[k])


def test_keep_clicking_past_the_target(fixture_predictor, parity_dir):
    ref = np.load(parity_dir / "predict_i_point_multimask.npz")["masks"][1]
    stop = SimulatedAnnotator(fixture_predictor, AnnotatorConfig(target_iou=0.5, max_clicks=5))
    go = SimulatedAnnotator(
        fixture_predictor, AnnotatorConfig(target_iou=0.5, max_clicks=5, stop_at_target=False)
    )
    a, b = stop.annotate(ref), go.annotate(ref)
    assert b.n_clicks >= a.n_clicks and b.ious[: a.n_clicks] == a.ious
    assert a.seconds == b.seconds


def test_brush_finishes_only_accepted_masks(fixture_predictor, parity_dir):
    """refine: brush delivers the reference once the clicks reached the target (the paper's
    annotators refined SAM's mask with brush and eraser); the effort figures are the clicks'."""
    ref = np.load(parity_dir / "predict_i_point_multimask.npz")["masks"][1]
    config = dict(target_iou=0.5, max_clicks=5)
    brush = SimulatedAnnotator(fixture_predictor, AnnotatorConfig(**config)).annotate(ref)
    plain = SimulatedAnnotator(fixture_predictor, AnnotatorConfig(**config, refine="none"))
    plain = plain.annotate(ref)
    assert brush.reached_target and brush.final_iou < 1.0
    assert np.array_equal(brush.delivered, ref) and not np.array_equal(brush.mask, ref)
    assert plain.brushed is None and plain.delivered is plain.mask
    assert brush.ious == plain.ious and brush.seconds == plain.seconds
    never = SimulatedAnnotator(fixture_predictor, AnnotatorConfig(target_iou=0.9999, max_clicks=2))
    missed = never.annotate(ref)
    assert not missed.reached_target and missed.brushed is None
