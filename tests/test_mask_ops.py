import pytest
import torch

from engine.mask_ops import box_xyxy_to_xywh, masks_to_boxes_xyxy, stability_score


def test_boxes_are_inclusive_and_empty_is_zero():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True
    masks[2, 5, 0] = True
    boxes = masks_to_boxes_xyxy(masks)
    assert boxes.tolist() == [[2, 1, 6, 3], [0, 0, 0, 0], [0, 5, 0, 5]]
    assert box_xyxy_to_xywh(boxes).tolist() == [[2, 1, 4, 2], [0, 0, 0, 0], [0, 5, 0, 0]]
    assert masks_to_boxes_xyxy(masks[None]).shape == (1, 3, 4)


def test_stability_score_counts_strictly_above_thresholds():
    logits = torch.tensor([[[2.0, 1.0, 0.5], [-1.0, -0.5, 1.5]]])
    # > 1: {2.0, 1.5} = 2; > -1: {2.0, 1.0, 0.5, -0.5, 1.5} = 5
    assert stability_score(logits, 0.0, 1.0).tolist() == [pytest.approx(0.4)]
    assert torch.isnan(stability_score(torch.full((1, 2, 2), -5.0), 0.0, 1.0)).all()
