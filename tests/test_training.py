"""Training: losses, prompt sampling, synthetic scenes, the MobileNetV2 encoder, and a tiny model
whose loss falls in a few real steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model import SamConfig, build_sam
from engine.training.losses import dice_loss, focal_loss, sam_loss
from engine.training.prompts import error_points, noisy_box
from engine.training.synthetic import SceneConfig, make_scene, photo_library
from engine.training.trainer import TrainConfig, TrainItem, encode_items, lr_at, train

TINY = SamConfig(
    encoder_type="mobilenet_v2",
    image_size=256,
    image_embedding_size=(16, 16),
    prompt_embed_dim=64,
    decoder_transformer_mlp_dim=128,
    decoder_transformer_num_heads=4,
    iou_head_hidden_dim=64,
    encoder_options={"pretrained": False, "freeze_backbone": True},
)


def tiny_config(**changes) -> TrainConfig:
    values = dict(
        steps=40,
        masks_per_image=4,
        rounds=3,
        rounds_without_point=1,
        warmup_steps=5,
        lr=1e-3,
        image_sizes=[256],
        log_every=5,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def photos():
    return photo_library()


@pytest.fixture
def one_thread():
    """Training on the shared 2-core machine: one thread is 3-6x faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sam_loss_backprops_only_the_lowest_loss_output():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good = target * 20 - 10  # logits matching the target
    logits = torch.stack([-good[:, 0], good[:, 0], torch.zeros(2, 8, 8)], dim=1).requires_grad_()
    iou_pred = torch.full((2, 3), 0.5, requires_grad=True)
    out = sam_loss(logits, iou_pred, target)
    assert out.chosen.tolist() == [1, 1]
    assert out.chosen_iou.tolist() == [1.0, 1.0]
    out.total.backward()
    grad = logits.grad.abs().flatten(2).sum(-1)
    assert (grad[:, 0] == 0).all() and (grad[:, 2] == 0).all() and (grad[:, 1] > 0).all()
    assert (iou_pred.grad != 0).all()  # the IoU head learns on every output


def test_focal_and_dice_are_small_for_a_right_mask_and_large_for_a_wrong_one():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    right, wrong = target * 24 - 12, 12 - target * 24
    assert focal_loss(right, target).item() < 1e-6 and dice_loss(right, target).item() < 1e-3
    assert focal_loss(wrong, target).item() > 0.5 and dice_loss(wrong, target).item() > 0.99


def test_noisy_box_stays_within_the_cap():
    mask = np.zeros((400, 400), bool)
    mask[100:300, 50:350] = True
    rng = np.random.default_rng(0)
    exact = np.array([50, 100, 349, 299])
    for _ in range(50):
        box = noisy_box(mask, rng, noise=0.1, max_noise=20)
        assert np.all(np.abs(box - exact) <= 20 + 1e-9)
    shifted = [np.abs(noisy_box(mask, rng) - exact).max() for _ in range(20)]
    assert max(shifted) > 1  # it really is noisy


def test_error_points_land_in_the_error_region_with_the_right_label():
    target = torch.zeros(2, 32, 32, dtype=torch.bool)
    target[:, 8:24, 8:24] = True
    pred = torch.zeros_like(target)
    pred[0] = target[0]
    pred[0, 8:24, 8:12] = False  # sample 0 misses a strip: positive click there
    pred[1, 0:4, 0:4] = True  # sample 1 spills into the corner and misses the object
    pred[1, 8:24, 8:24] = True
    valid = torch.ones(32, 32, dtype=torch.bool)
    rng = np.random.default_rng(1)
    for _ in range(20):
        coords, labels = error_points(pred, target, valid, rng)
        x, y = coords[0].astype(int)
        assert labels[0] == 1 and 8 <= y < 24 and 8 <= x < 12
        x, y = coords[1].astype(int)
        assert labels[1] == 0 and x < 4 and y < 4


def test_synthetic_scenes_are_deterministic_and_have_masks(photos):
    config = SceneConfig(min_side=160, max_side=200)
    a_img, a_masks = make_scene(3, config, photos)
    b_img, b_masks = make_scene(3, config, photos)
    assert np.array_equal(a_img, b_img) and len(a_masks) == len(b_masks) >= 1
    assert a_img.dtype == np.uint8 and a_img.shape[2] == 3 and max(a_img.shape[:2]) <= 200
    for m in a_masks:
        assert m.shape == a_img.shape[:2] and m.any()
    c_img, _ = make_scene(4, config, photos)
    assert not np.array_equal(a_img, c_img)


def test_masks_covering_most_of_the_image_are_left_out():
    image = np.full((64, 64, 3), 120, np.uint8)
    big = np.ones((64, 64), bool)
    big[:3] = False  # 95% of the image
    small = np.zeros((64, 64), bool)
    small[10:30, 10:30] = True
    sam = build_sam(TINY)
    items = [TrainItem("x", lambda: (image, [big, small]))]
    encoded, skipped = encode_items(sam, items, tiny_config(), log=lambda s: None)
    assert skipped == {"mask > max_mask_area": 1}
    assert len(encoded) == 1 and len(encoded[0].targets) == 1


def test_warm_up_then_decay():
    config = tiny_config(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(99, config) < 2e-4 and lr_at(50, config) < lr_at(20, config)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rounds_without_point"):
        tiny_config(rounds=2, rounds_without_point=2).validate()
    with pytest.raises(ValueError, match="image_sizes"):
        tiny_config(image_sizes=[100]).validate()


def test_tiny_model_loss_falls_and_only_trainable_parts_change(photos, one_thread):
    torch.manual_seed(0)
    sam = build_sam(TINY)
    backbone_before = {k: v.clone() for k, v in sam.image_encoder.backbone.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in sam.mask_decoder.state_dict().items()}
    scenes = [make_scene(s, SceneConfig(min_side=200, max_side=256), photos) for s in (0, 1)]
    items = [TrainItem(f"s{i}", lambda s=s: s) for i, s in enumerate(scenes)]
    result = train(sam, items, tiny_config(), log=lambda s: None)
    losses = [h["loss"] for h in result.loss_history]
    assert result.steps == 40 and len(losses) == 8
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    for k, v in sam.image_encoder.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), f"frozen backbone changed: {k}"
    changed = [k for k, v in sam.mask_decoder.state_dict().items() if not torch.equal(v, decoder_before[k])]
    assert changed
    assert not sam.training and sam.prompt_encoder.image_embedding_size == (16, 16)


def test_mobilenet_v2_loads_imagenet_weights_strictly_and_sees_a_cat(demo_photos):
    """The hand-written MobileNetV2 is torchvision's: the ImageNet weights load with strict=True
    and, with the classifier put back on top, the demo cat is classified as a cat."""
    import cv2

    from engine.image_io import load_image
    from engine.modeling.mobilenet_v2 import ConvBNReLU, MobileNetV2Features, pretrained_weights_path

    try:
        path = pretrained_weights_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = MobileNetV2Features()
    backbone.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("classifier", "features.18"))},
        strict=True,
    )
    head = ConvBNReLU(320, 1280, kernel=1)
    head.load_state_dict(
        {k.removeprefix("features.18."): v for k, v in state.items() if k.startswith("features.18.")}
    )
    classifier = torch.nn.Linear(1280, 1000)
    classifier.load_state_dict({"weight": state["classifier.1.weight"], "bias": state["classifier.1.bias"]})
    cat = [p for p in demo_photos if p.stem == "chelsea"]
    if not cat:
        pytest.skip("demo/photos/chelsea.jpg is absent")
    image = cv2.resize(load_image(cat[0]), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    backbone.eval(), head.eval()
    with torch.no_grad():
        _, stride32 = backbone(x)
        top = classifier(head(stride32).mean((2, 3))).argmax().item()
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat (281-285)"


def test_coco_masks_split_by_image_for_training_and_the_gate(shared_data_dir, tmp_path):
    """`train --coco` / `evaluate --coco` on real COCO person masks: the two splits share no
    image and make up the whole file, crowd regions are left out, and the masks are pycocotools'."""
    import json

    from pycocotools.coco import COCO

    from engine.training.data import coco_items

    annotations = shared_data_dir / "annotations" / "coco_persons_keypoints.json"
    images = shared_data_dir / "images"
    train, train_info = coco_items(annotations, images, "train", 0.3)
    held, held_info = coco_items(annotations, images, "held_out", 0.3)
    every, every_info = coco_items(annotations, images, "all", 0.3)

    def ids(items):
        return {item.image_id for item in items}

    assert train and held and ids(train).isdisjoint(ids(held)) and ids(train) | ids(held) == ids(every)
    assert train_info["masks"] + held_info["masks"] == every_info["masks"]
    data = json.loads(annotations.read_text())
    assert every_info["masks"] == sum(1 for a in data["annotations"] if not a.get("iscrowd"))

    coco = COCO(str(annotations))
    image_id = int(held[0].image_id.split(":")[1])
    image, masks = held[0].load()
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
    assert image.shape[:2] == masks[0].shape and image.dtype == np.uint8
    assert len(masks) == len(anns)
    assert all(np.array_equal(m, coco.annToMask(a).astype(bool)) for m, a in zip(masks, anns))

    with pytest.raises(ValueError, match="does not exist: pass --coco FILE.json"):
        coco_items(tmp_path / "none.json", images)
    with pytest.raises(ValueError, match="does not exist: pass --images DIR"):
        coco_items(annotations, tmp_path / "none")
    (tmp_path / "broken.json").write_text('{"images": [], "annotations": 3}')
    with pytest.raises(ValueError, match="broken.json: cannot be read"):
        coco_items(tmp_path / "broken.json", images)


def test_a_coco_file_without_masks_is_refused_in_one_line(shared_data_dir):
    """Face boxes (whole-body keypoints, no segmentation): a clear error before any image is
    read (it was a KeyError traceback from pycocotools, after encoding)."""
    from engine.training.data import coco_items

    faces = shared_data_dir / "annotations" / "faces_coco_wholebody.json"
    with pytest.raises(ValueError, match=r"annotation \d+ has no mask .*cannot train or judge"):
        coco_items(faces, shared_data_dir / "images", "all")


def test_coco_masks_of_an_exif_rotated_photo_are_left_out_with_their_reason(
    shared_data_dir, parity_dir, tmp_path
):
    """A COCO file's masks are in the frame of the pixels it was drawn on; an EXIF-rotated copy
    of the photo is read upright, so its masks do not fit: training and the gate leave the image
    out with that reason (training resized the masks onto the rotated image; the gate stopped)."""
    import json

    from PIL import Image

    from engine.model import ModelConfig, load_model
    from engine.training.data import coco_items
    from engine.training.gate import GateConfig, score_model
    from engine.training.trainer import MasksDoNotFitImage

    data = json.loads((shared_data_dir / "annotations" / "coco_persons_keypoints.json").read_text())
    masked = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd") and a.get("area", 0) > 2000}
    picked = [i for i in data["images"] if i["width"] != i["height"] and i["id"] in masked][:2]
    ids = {i["id"] for i in picked}
    subset = {**data, "images": picked, "annotations": [
        a for a in data["annotations"] if a["image_id"] in ids and not a.get("iscrowd")
    ]}  # fmt: skip
    (tmp_path / "sub.json").write_text(json.dumps(subset))
    for info in picked:
        (tmp_path / info["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        source = shared_data_dir / "images" / info["file_name"]
        (tmp_path / info["file_name"]).write_bytes(source.read_bytes())
    rotated = tmp_path / picked[1]["file_name"]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as is, shown turned a quarter
    Image.open(rotated).save(rotated, exif=exif.tobytes(), quality=95)

    items, _ = coco_items(tmp_path / "sub.json", tmp_path, "all")
    assert [item.image_id for item in items] == [f"coco:{i}" for i in sorted(ids)]
    by_id = {item.image_id: item for item in items}
    image, masks = by_id[f"coco:{picked[0]['id']}"].load()
    assert image.shape[:2] == masks[0].shape
    with pytest.raises(MasksDoNotFitImage, match=r"\(EXIF-rotated\?\): give the masks in the image"):
        by_id[f"coco:{picked[1]['id']}"].load()

    sam = load_model(ModelConfig(model=str(parity_dir / "config.json"),
                                 checkpoint=str(parity_dir / "sam_small.pth"), device="cpu"))
    score = score_model(sam, items, GateConfig(max_clicks=5, max_masks=2), log=lambda _: None)
    assert score.images == 1
    assert [(s["image"], s["reason"]) for s in score.skipped] == [
        (f"coco:{picked[1]['id']}", "masks do not fit the image")
    ]
