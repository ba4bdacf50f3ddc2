"""SamPredictor behaviour beyond parity: errors, batching, dtype flow, saved image state, other sizes."""

import numpy as np
import pytest
import torch

from engine.image_io import load_image
from engine.model import SamConfig, build_sam
from engine.predictor import ImageEmbedding, SamPredictor


@pytest.fixture(scope="module")
def model(parity_dir):
    return build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")


@pytest.fixture(scope="module")
def image(parity_dir):
    return load_image(parity_dir / "image.png")


@pytest.fixture(scope="module")
def predictor(model, image):
    predictor = SamPredictor(model)
    predictor.set_image(image)
    return predictor


def test_predict_before_set_image_is_runtime_error(model):
    predictor = SamPredictor(model)
    assert not predictor.is_image_set and predictor.features is None
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(np.array([[1.0, 2.0]]), np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.get_image_embedding()


def test_bad_inputs_are_value_errors(predictor, image):
    point = np.array([[530.0, 250.0]])
    with pytest.raises(ValueError, match="given together"):
        predictor.predict(point_coords=point)
    with pytest.raises(ValueError, match="Nx2"):
        predictor.predict(np.array([1.0, 2.0, 3.0]), np.array([1]))
    with pytest.raises(ValueError, match="one label per point"):
        predictor.predict(point, np.array([1, 1]))
    with pytest.raises(ValueError, match="1 \\(foreground\\)"):
        predictor.predict(point, np.array([5]))
    with pytest.raises(ValueError, match="box must hold 4"):
        predictor.predict(box=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="mask_input must be 1x256x256"):
        predictor.predict(point, np.array([1]), mask_input=np.zeros((256, 256), np.float32))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        SamPredictor(predictor.model).set_image(image.astype(np.float32))
    with pytest.raises(ValueError, match="image_format"):
        SamPredictor(predictor.model).set_image(image, image_format="RGBA")
    with pytest.raises(ValueError, match="BxNx2"):
        predictor.predict_torch(torch.zeros(2, 2), torch.ones(2, 1))


def test_bgr_input_gives_the_same_embedding(predictor, image):
    other = SamPredictor(predictor.model)
    other.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    assert torch.equal(other.get_image_embedding(), predictor.get_image_embedding())
    other.reset_image()
    assert not other.is_image_set and other.original_size is None


def test_saved_image_state_restores_identical_outputs(parity_dir, predictor, tmp_path):
    path = tmp_path / "embedding.npz"
    predictor.get_image_state().save(path)
    fresh = SamPredictor(
        build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    )
    loaded = ImageEmbedding.load(path)
    assert loaded.encoder_fingerprint == predictor.get_image_state().encoder_fingerprint
    fresh.set_image_state(loaded)
    assert (
        fresh.input_size == predictor.input_size and fresh.original_size == predictor.original_size
    )
    prompts = dict(
        point_coords=np.array([[530.0, 250.0], [900.0, 100.0]]),
        point_labels=np.array([1, 0]),
        box=np.array([100.0, 170.0, 900.0, 672.0]),
    )
    for got, expected in zip(fresh.predict(**prompts), predictor.predict(**prompts)):
        assert np.array_equal(got, expected)


def test_image_state_from_another_model_is_refused(predictor, tmp_path):
    tiny = build_sam(
        SamConfig(
            image_size=512,
            image_embedding_size=(32, 32),
            encoder_embed_dim=32,
            encoder_depth=1,
            encoder_num_heads=2,
            encoder_global_attn_indexes=(0,),
        )
    )
    with pytest.raises(ValueError, match="another model"):
        SamPredictor(tiny).set_image_state(predictor.get_image_state())
    retrained = build_sam(predictor.model.config)
    retrained.load_state_dict(predictor.model.state_dict())
    with torch.no_grad():
        retrained.image_encoder.neck[3].bias.add_(0.01)
    with pytest.raises(ValueError, match="another image encoder"):
        SamPredictor(retrained).set_image_state(predictor.get_image_state())
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="junk.npz"):
        ImageEmbedding.load(tmp_path / "junk.npz")


def test_predict_torch_batch_matches_single_prompts(predictor):
    points = np.array([[530.0, 250.0], [940.0, 160.0], [300.0, 500.0]])
    coords = predictor.transform.apply_coords(points, predictor.original_size)
    batch_coords = torch.as_tensor(coords)[
        :, None, :
    ]  # float64, as the automatic generator passes them
    assert batch_coords.dtype == torch.float64
    masks, scores, low_res = predictor.predict_torch(
        batch_coords, torch.ones(3, 1, dtype=torch.int)
    )
    assert masks.shape == (3, 3, *predictor.original_size) and masks.dtype == torch.bool
    assert scores.shape == (3, 3) and low_res.shape == (3, 3, 256, 256)
    for i, point in enumerate(points):
        single_masks, single_scores, single_low = predictor.predict(point[None], np.array([1]))
        np.testing.assert_allclose(single_scores, scores[i].numpy(), atol=1e-4)
        np.testing.assert_allclose(single_low, low_res[i].numpy(), atol=2e-3)
        assert (single_masks != masks[i].numpy()).mean() <= 1e-4
    logits, _, _ = predictor.predict_torch(
        batch_coords[:1], torch.ones(1, 1, dtype=torch.int), return_logits=True
    )
    assert logits.dtype == torch.float32 and torch.equal(logits > 0, masks[:1])


def test_float64_coords_are_normalised_before_the_float32_cast(model):
    pe = model.prompt_encoder.pe_layer
    coords = torch.tensor([[[1000.123456789, 3.3]]], dtype=torch.float64)
    expected = pe._encode((coords / 1024).float())
    assert torch.equal(pe.forward_with_coords(coords, (1024, 1024)), expected)
    assert torch.equal(
        pe.forward_with_coords(coords.float(), (1024, 1024)), pe._encode(coords.float() / 1024)
    )


def test_other_input_sizes_work_end_to_end(image):
    config = SamConfig(
        image_size=256,
        image_embedding_size=(16, 16),
        window_size=4,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        prompt_embed_dim=64,
        mask_in_chans=8,
        decoder_transformer_mlp_dim=128,
        iou_head_hidden_dim=32,
    )
    predictor = SamPredictor(build_sam(config))
    predictor.set_image(image)
    assert predictor.input_size == (143, 256) and predictor.features.shape == (1, 64, 16, 16)
    masks, scores, low_res = predictor.predict(
        np.array([[10.0, 20.0]]), np.array([1]), multimask_output=False
    )
    assert masks.shape == (1, *image.shape[:2]) and low_res.shape == (1, 64, 64)
    masks, scores, low_res = predictor.predict(box=np.array([5, 5, 300, 200]), mask_input=low_res)
    assert masks.shape == (3, *image.shape[:2]) and scores.shape == (3,)


def test_bf16_autocast_runs_and_returns_float32(predictor, image):
    fast = SamPredictor(predictor.model, autocast_dtype=torch.bfloat16)
    fast.set_image(image)
    assert fast.features.dtype == torch.float32
    reference = predictor.get_image_embedding()
    assert (fast.features - reference).abs().max() < 0.1 * reference.abs().max()
    point, label = np.array([[530.0, 250.0]]), np.array([1])
    masks, scores, low_res = fast.predict(point, label)
    expected_masks, expected_scores, _ = predictor.predict(point, label)
    assert scores.dtype == np.float32 and low_res.dtype == np.float32 and masks.dtype == bool
    assert np.abs(scores - expected_scores).max() < 0.1
    assert (masks != expected_masks).mean() < 0.01


def test_model_forward_matches_the_predictor(predictor, image):
    model = predictor.model
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)
    coords = torch.as_tensor(
        predictor.transform.apply_coords(np.array([[[530.0, 250.0]]]), image.shape[:2])
    )
    labels = torch.ones(1, 1, dtype=torch.int)
    box = torch.as_tensor(
        predictor.transform.apply_boxes(np.array([100.0, 170.0, 900.0, 672.0]), image.shape[:2])
    )
    with torch.no_grad():
        (out,) = model(
            [
                {
                    "image": resized,
                    "original_size": image.shape[:2],
                    "point_coords": coords,
                    "point_labels": labels,
                    "boxes": box,
                }
            ],
            multimask_output=False,
        )
    masks, scores, low_res = predictor.predict_torch(
        coords, labels, boxes=box, multimask_output=False
    )
    assert out["masks"].shape == (1, 1, *image.shape[:2])
    torch.testing.assert_close(out["low_res_logits"], low_res, rtol=0, atol=2e-3)
    torch.testing.assert_close(out["iou_predictions"], scores, rtol=0, atol=1e-4)
    assert (out["masks"] != masks).float().mean() <= 1e-4
