"""Agreement with Meta's segment-anything on the parity fixture (outputs of the official code)."""

import numpy as np
import pytest

from engine.image_io import load_image
from engine.model import build_sam
from engine.predictor import SamPredictor

CASES = ["i_point_multimask", "ii_points_2fg_1bg", "iii_box", "iv_box_point", "v_point_mask_input"]


@pytest.fixture(scope="module")
def predictor(parity_dir):
    model = build_sam(str(parity_dir / "config.json"), checkpoint=str(parity_dir / "sam_small.pth"))
    predictor = SamPredictor(model)
    predictor.set_image(load_image(parity_dir / "image.png"))
    return predictor


def test_resize_is_bit_exact(parity_dir, predictor):
    reference = np.load(parity_dir / "image_embedding.npz")
    resized = predictor.transform.apply_image(load_image(parity_dir / "image.png"))
    assert resized.dtype == np.uint8
    assert np.array_equal(resized, reference["resized_image_uint8"])


def test_image_embedding(parity_dir, predictor):
    reference = np.load(parity_dir / "image_embedding.npz")
    embedding = predictor.get_image_embedding().cpu().numpy()
    assert embedding.shape == reference["image_embedding"].shape
    np.testing.assert_allclose(embedding, reference["image_embedding"], rtol=0, atol=1e-4)
    assert predictor.input_size == tuple(reference["input_size"])
    assert predictor.original_size == tuple(reference["original_size"])


@pytest.mark.parametrize("case", CASES)
def test_predict_cases(parity_dir, predictor, case):
    reference = np.load(parity_dir / f"predict_{case}.npz")
    prompts = {
        k: reference[k]
        for k in ("point_coords", "point_labels", "box", "mask_input")
        if k in reference
    }
    masks, scores, low_res = predictor.predict(
        **prompts, multimask_output=bool(reference["multimask_output"])
    )
    assert masks.dtype == bool and masks.shape == reference["masks"].shape
    assert scores.dtype == np.float32 and low_res.dtype == np.float32
    np.testing.assert_allclose(low_res, reference["low_res_logits"], rtol=0, atol=2e-3)
    np.testing.assert_allclose(scores, reference["scores"], rtol=0, atol=1e-4)
    assert (masks != reference["masks"]).mean() <= 1e-4
