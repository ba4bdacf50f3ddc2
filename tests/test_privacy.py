"""Privacy stage on real photos with the real detectors: conversion, detection, blur, config."""

import json

import numpy as np
import pytest

from engine.image_io import load_image
from engine.privacy import Detection, PrivacyConfig, PrivacyFilter
from engine.privacy.blur import blur_regions, region_mask
from engine.privacy.detectors import package_file, tiles
from engine.privacy.graphdef import read_graph
from engine.privacy.retinaface import GRAPH_SHA256, ensure_converted, nms

ASTRONAUT_FACE = (180, 62, 268, 180)  # hand-labelled XYXY face of demo/photos/astronaut.jpg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("privacy-cache")


@pytest.fixture(scope="module")
def privacy(cache_dir):
    return PrivacyFilter(PrivacyConfig(cache_dir=str(cache_dir)))


def _photo(demo_photos, name):
    return load_image(next(p for p in demo_photos if p.name == name))


def test_graph_reader_parses_the_frozen_graph_without_tensorflow(tmp_path):
    nodes = read_graph(package_file("retinaface", "src/frozen_graph.pb"))
    ops = {n.op for n in nodes.values()}
    assert {"Conv2D", "DepthwiseConv2dNative", "FusedBatchNormV3", "NonMaxSuppressionV3"} <= ops
    iou = nodes["RetinaFaceModel/tf_op_layer_NonMaxSuppressionV3/NonMaxSuppressionV3/iou_threshold"]
    assert abs(float(iou.attrs["value"]) - 0.4) < 1e-6  # the NMS IoU the module uses
    bad = tmp_path / "bad.pb"
    bad.write_bytes(b"\xff\xff\xff not a graph")
    with pytest.raises(ValueError, match="not a TensorFlow GraphDef"):
        read_graph(bad)


def test_conversion_is_cached_with_a_checksum_and_redone_when_corrupt(tmp_path):
    graph = package_file("retinaface", "src/frozen_graph.pb")
    first = ensure_converted(graph, tmp_path)
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["graph_sha256"] == GRAPH_SHA256 and record["sha256"] == first.sha256
    mtime = first.path.stat().st_mtime_ns
    assert ensure_converted(graph, tmp_path).path.stat().st_mtime_ns == mtime  # reused
    first.path.write_bytes(b"truncated")
    again = ensure_converted(graph, tmp_path)
    assert again.sha256 == first.sha256  # reconverted, bit-identical
    other = tmp_path / "other.pb"
    other.write_bytes(graph.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not the frozen graph of retinaface==1.1.1"):
        ensure_converted(other, tmp_path / "fresh")


def test_finds_the_astronaut_face_and_nothing_in_photos_without_people(privacy, demo_photos):
    faces = privacy.detect(_photo(demo_photos, "astronaut.jpg"))
    assert [d.kind for d in faces] == ["face"]
    x0, y0, x1, y1 = faces[0].box
    gx0, gy0, gx1, gy1 = ASTRONAUT_FACE
    inter = max(0, min(x1, gx1) - max(x0, gx0)) * max(0, min(y1, gy1) - max(y0, gy0))
    union = (x1 - x0) * (y1 - y0) + (gx1 - gx0) * (gy1 - gy0) - inter
    assert inter / union > 0.7 and faces[0].score > 0.9
    for name in ("rocket.jpg", "coffee.jpg", "chelsea.jpg"):  # a rocket, a cup, a cat
        assert privacy.detect(_photo(demo_photos, name)) == [], name


def test_blur_removes_the_face_and_leaves_the_rest(privacy, demo_photos):
    rgb = _photo(demo_photos, "astronaut.jpg")
    result = privacy.blur(rgb)
    x0, y0, x1, y1 = ASTRONAUT_FACE
    before = rgb[y0:y1, x0:x1].astype(float)
    after = result.image[y0:y1, x0:x1].astype(float)
    assert result.mask[y0:y1, x0:x1].mean() > 0.9
    # detail (local gradients) inside the face is gone, not just dimmed
    grad = lambda a: np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()
    assert grad(after) < 0.15 * grad(before)
    assert np.array_equal(result.image[~result.mask], rgb[~result.mask])  # nothing else touched
    assert result.counts() == {"faces": 1, "plates": 0}


def test_pixelate_is_many_to_one_and_gaussian_mode_also_blurs():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)
    b = a.copy()
    b[40:80:2, 40:80:2] = 255 - b[40:80:2, 40:80:2]  # a different "face" with the same averages?
    det = [Detection("plate", (30.0, 30.0, 90.0, 90.0), 1.0)]
    out_a, mask = blur_regions(a, det, margin=1.0, mode="pixelate", strength=0.2)
    assert mask[30:90, 30:90].all() and not mask[:30].any()
    grad = lambda x: np.abs(np.diff(x.astype(float), axis=1)).mean()
    assert grad(out_a[30:90, 30:90]) < 0.05 * grad(a[30:90, 30:90])
    out_g, _ = blur_regions(a, det, margin=1.0, mode="gaussian", strength=0.2)
    assert grad(out_g[30:90, 30:90]) < 0.1 * grad(a[30:90, 30:90])
    with pytest.raises(ValueError, match="blur mode"):
        blur_regions(a, det, mode="box")


def test_margin_enlarges_and_faces_are_ellipses():
    face = Detection("face", (100.0, 100.0, 140.0, 150.0), 0.99)
    plate = Detection("plate", (100.0, 100.0, 140.0, 150.0), 0.99)
    ellipse = region_mask(face, 1.3, 400, 400)
    rect = region_mask(plate, 1.3, 400, 400)
    area = (40 * 1.3) * (50 * 1.3)
    assert abs(rect.sum() - area) / area < 0.05
    assert abs(ellipse.sum() - np.pi / 4 * area) / area < 0.03
    assert ellipse[125, 120] and not ellipse[101, 101]  # centre in, corner out
    edge = region_mask(face, 1.3, 130, 130)  # clipped at the image border
    assert edge.shape == (130, 130) and edge.any()


def test_tiles_cover_the_image_with_overlap():
    boxes = tiles(1000, 2500, 1280, 256)
    cover = np.zeros((1000, 2500), bool)
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 <= 1280 and y1 - y0 <= 1280
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    starts = sorted({b[0] for b in boxes})
    assert all(b - a <= 1280 - 256 for a, b in zip(starts, starts[1:]))  # overlap >= 256 px
    assert tiles(300, 400, 1280, 256) == [(0, 0, 400, 300)]


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    assert nms(boxes, np.array([0.8, 0.9, 0.7], np.float32), 0.4).tolist() == [1, 2]


def test_config_rejects_bad_values():
    for bad in (
        {"face_score": 1.5},
        {"margin": 0.9},
        {"blur": "box"},
        {"face_scales": []},
        {"tile_size": 100},
        {"device": "tpu"},
    ):
        with pytest.raises(ValueError, match="privacy."):
            PrivacyConfig(**bad)
    with pytest.raises(ValueError, match="face_backend='yolo' is unknown"):
        PrivacyFilter(PrivacyConfig(face_backend="yolo"))


def test_plates_blurred_on_real_car_photos(cache_dir, shared_data_dir):
    from pycocotools.coco import COCO

    plates_only = PrivacyFilter(PrivacyConfig(face_backend="none", cache_dir=str(cache_dir)))
    coco = COCO(str(shared_data_dir / "annotations" / "plates_eu.json"))
    for image_id in sorted(coco.getImgIds())[:3]:
        info = coco.loadImgs(image_id)[0]
        result = plates_only.blur(load_image(shared_data_dir / "images" / info["file_name"]))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            assert result.mask[y : y + h, x : x + w].mean() > 0.9, info["file_name"]
            assert result.counts()["plates"] >= 1


def test_faces_blurred_on_real_group_photos(privacy, shared_data_dir):
    from pycocotools.coco import COCO

    coco = COCO(str(shared_data_dir / "annotations" / "faces_from_coco_keypoints.json"))
    by_image = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        info = coco.loadImgs(ann["image_id"])[0]
        inside = x > 2 and y > 2 and x + w < info["width"] - 2 and y + h < info["height"] - 2
        if w >= 24 and inside:  # faces cut by the border are measured by the bench, not here
            by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id in sorted(by_image, key=lambda i: -len(by_image[i]))[:2]:  # the busiest photos
        info = coco.loadImgs(image_id)[0]
        result = privacy.blur(load_image(shared_data_dir / "images" / info["file_name"]))
        for ann in by_image[image_id]:
            kp = np.asarray(ann["face_keypoints"], float).reshape(5, 3)[:3]
            for x, y, v in kp:
                if v > 0:
                    assert result.mask[int(y), int(x)], (info["file_name"], ann["id"])
