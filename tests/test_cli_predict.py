"""`sa-engine predict` end to end on the parity model and a real photo."""

import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from engine.cli.main import app
from engine.image_io import load_image
from engine.mask_ops import stability_score
from engine.model import build_sam
from engine.predictor import SamPredictor

runner = CliRunner()


@pytest.fixture(scope="module")
def model_args(parity_dir):
    return [
        "--model",
        str(parity_dir / "config.json"),
        "--checkpoint",
        str(parity_dir / "sam_small.pth"),
    ]


def test_predict_writes_record_masks_and_overlay_matching_the_predictor(
    parity_dir, model_args, tmp_path
):
    image_path = parity_dir / "image.png"
    result = runner.invoke(
        app,
        [
            "predict",
            str(image_path),
            *model_args,
            "--point",
            "530,250",
            "--point",
            "900,100,0",
            "--multimask",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--save-embedding",
            str(tmp_path / "emb.npz"),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "image.json").read_text())
    assert record["image"] == {
        "image_id": 0,
        "width": 1201,
        "height": 673,
        "file_name": "image.png",
    }
    annotations = record["annotations"]
    assert len(annotations) == 3

    predictor = SamPredictor(
        build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    )
    predictor.set_image(load_image(image_path))
    points, labels = np.array([[530.0, 250.0], [900.0, 100.0]]), np.array([1, 0])
    masks, scores, _ = predictor.predict(points, labels, multimask_output=True)
    logits, _, _ = predictor.predict(points, labels, multimask_output=True, return_logits=True)
    stability = stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()

    decoded = (
        mask_utils.decode(
            [
                {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                for a in annotations
            ]
        )
        .transpose(2, 0, 1)
        .astype(bool)
    )
    assert np.array_equal(decoded, masks)
    for i, annotation in enumerate(annotations):
        ys, xs = np.nonzero(masks[i])
        assert annotation["area"] == int(masks[i].sum())
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert annotation["predicted_iou"] == pytest.approx(float(scores[i]), abs=1e-6)
        assert annotation["stability_score"] == pytest.approx(float(stability[i]), abs=1e-6)
        assert annotation["crop_box"] == [0, 0, 1201, 673]
        assert annotation["point_coords"] == [[530.0, 250.0], [900.0, 100.0]]
        png = cv2.imread(str(tmp_path / f"image_mask{i}.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(png > 127, masks[i])
    overlay = cv2.imread(str(tmp_path / "image_overlay.png"))
    assert overlay.shape == (673, 3 * 1201, 3)
    assert "predicted_iou" in result.output

    # The saved embedding decodes the same masks without running the encoder.
    again = tmp_path / "again"
    result = runner.invoke(
        app,
        [
            "predict",
            str(image_path),
            *model_args,
            "--point",
            "530,250",
            "--point",
            "900,100,0",
            "--multimask",
            "--device",
            "cpu",
            "--out",
            str(again),
            "--embedding",
            str(tmp_path / "emb.npz"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((again / "image.json").read_text()) == record


def test_box_prompt_on_a_demo_photo(demo_photos, model_args, tmp_path):
    photo = demo_photos[0]
    height, width = load_image(photo).shape[:2]
    result = runner.invoke(
        app,
        [
            "predict",
            str(photo),
            *model_args,
            "--box",
            f"10,10,{width // 2},{height // 2}",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / f"{photo.stem}.json").read_text())
    (annotation,) = record["annotations"]
    assert (
        annotation["segmentation"]["size"] == [height, width] and annotation["point_coords"] == []
    )
    assert (tmp_path / f"{photo.stem}_overlay.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "at least one --point"),
        (["--point", "1,2,7"], "label must be 1"),
        (["--point", "a,b"], "expected x,y"),
        (["--box", "5,5,1,1"], "x0 < x1"),
        (["--point", "5000,5"], "outside"),
        (["--box", "5000,5,6000,50"], "does not overlap"),  # (one over the edges is clipped: fine)
    ],
)
def test_bad_prompts_fail_with_one_line(parity_dir, model_args, tmp_path, extra, message):
    result = runner.invoke(
        app, ["predict", str(parity_dir / "image.png"), *model_args, *extra, "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_unreadable_image_and_wrong_checkpoint_fail_clearly(parity_dir, model_args, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is not a picture")
    result = runner.invoke(
        app, ["predict", str(broken), *model_args, "--point", "1,1", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1 and str(broken) in result.output
    assert len(result.output.strip().splitlines()) == 1

    result = runner.invoke(
        app,
        [
            "predict",
            str(parity_dir / "image.png"),
            "--model",
            "vit_b",
            "--checkpoint",
            str(parity_dir / "sam_small.pth"),
            "--point",
            "1,1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1 and "does not fit vit_b" in result.output
    result = runner.invoke(
        app,
        ["predict", str(parity_dir / "image.png"), "--model", "vit_b", "--point", "1,1",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 1 and "--checkpoint is required" in result.output


def test_predict_defaults_to_the_bundled_model(parity_dir, tmp_path):
    # no --model: the config's model: block, the bundled model with its packaged weights
    result = runner.invoke(
        app,
        ["predict", str(parity_dir / "image.png"), "--point", "530,250", "--device", "cpu",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "image.json").is_file() and "mask 0: predicted_iou" in result.output
    result = runner.invoke(
        app,
        ["predict", str(parity_dir / "image.png"), "--point", "1,1", "--set", "model.bogus=1",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 1 and "unknown keys ['bogus']" in result.output


def test_a_checkpoint_alone_runs_the_architecture_it_fits(parity_dir, demo_photos, tmp_path):
    """`--checkpoint sam_vit_b_01ec64.pth` without --model: the config's model is the bundled
    one, which the checkpoint does not fit, so the command runs vit_b (it refused before)."""
    from tests.test_model_build import shaped_like

    checkpoint = shaped_like("vit_b", tmp_path / "sam_vit_b_01ec64.pth")
    result = runner.invoke(
        app,
        ["predict", str(demo_photos[0]), "--checkpoint", str(checkpoint), "--point", "20,20",
         "--device", "cpu", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"model: vit_b, the architecture {checkpoint.resolve()} fits" in result.output
    assert (tmp_path / "out" / f"{demo_photos[0].stem}.json").is_file()
    # a checkpoint of dims no named model has still needs its config
    result = runner.invoke(
        app,
        ["predict", str(demo_photos[0]), "--checkpoint", str(parity_dir / "sam_small.pth"),
         "--point", "20,20", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1 and "does not fit default" in result.output
