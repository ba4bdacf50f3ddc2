"""The one RLE path, against pycocotools and the real RLE vectors in ../shared."""

import json

import numpy as np
from pycocotools import mask as mask_utils

from engine import rle


def test_round_trip_is_column_major():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 37, 53)) > 0.6
    encoded = rle.encode(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [37, 53] for r in encoded)
    assert np.array_equal(rle.decode(encoded), masks)
    assert np.array_equal(rle.area(encoded), masks.sum((1, 2)))
    # a mask with one pixel at (row 0, col 1): column-major counts are [h, 1, ...]
    single = np.zeros((4, 3), bool)
    single[0, 1] = True
    raw = mask_utils.decode(rle._as_bytes(rle.encode(single)[0]))
    assert raw[0, 1] == 1 and raw.sum() == 1


def test_area_over_256_rles():
    masks = np.zeros((300, 8, 8), bool)
    masks[:, :2, :3] = True
    assert (rle.area(rle.encode(masks)) == 6).all()


def test_real_rle_strings_round_trip(shared_data_dir):
    results = json.loads((shared_data_dir / "rle_vectors" /
                          "cocoapi_instances_val2014_fakesegm100_results.json").read_text())
    segs = [r["segmentation"] for r in results]
    assert len(segs) > 100
    assert len({tuple(s["size"]) for s in segs}) > 1
    masks = [rle.decode(s) for s in segs]
    # the strings were written by other encoders (not always canonical): compare pixels, not text
    again = [rle.encode(m)[0] for m in masks]
    assert all(np.array_equal(rle.decode(a), m) for a, m in zip(again, masks))
    assert np.allclose(rle.bbox_xywh(again), rle.bbox_xywh(segs))
    assert np.array_equal(rle.area(segs), [m.sum() for m in masks])


def test_crowd_vectors_compress_like_pycocotools(shared_data_dir):
    vectors = json.loads((shared_data_dir / "rle_vectors" / "rle_test_vectors.json").read_text())
    crowd = [v for v in vectors if "uncompressed_rle" in v]
    assert crowd
    for v in crowd:
        raw = v["uncompressed_rle"]
        compressed = rle.from_uncompressed(raw["size"], raw["counts"])
        assert compressed["counts"] == v["pycocotools_compressed_counts"], v["name"]
        assert rle.area([raw])[0] == v["pycocotools_area"], v["name"]
        assert np.allclose(rle.bbox_xywh([raw])[0], v["pycocotools_bbox"]), v["name"]
    zero_leading = next(v for v in vectors if "ZeroLeading" in v["name"])
    assert rle.area([zero_leading["input_rle"]])[0] == zero_leading["pycocotools_decode_area"]


def test_pairwise_iou_matches_decoded_masks(shared_data_dir):
    results = json.loads((shared_data_dir / "rle_vectors" /
                          "cocoapi_instances_val2014_fakesegm100_results.json").read_text())
    segs = [r["segmentation"] for r in results if r["segmentation"]["size"] == [480, 640]][:40]
    assert len(segs) == 40  # masks of several images of one size: some overlap, most do not
    segs.append(dict(segs[0]))  # an exact copy: IoU 1 with the first
    masks = rle.decode(segs)
    expected = np.zeros((len(masks), len(masks)))
    for i, a in enumerate(masks):
        for j, b in enumerate(masks):
            union = (a | b).sum()
            expected[i, j] = (a & b).sum() / union if union else 0.0
    got = rle.iou(segs)
    assert got.shape == (len(segs), len(segs)) and np.allclose(got, expected)
    assert got[0, -1] == 1.0 and (np.diag(got) == 1).all()
    assert rle.iou([]).shape == (0, 0)


def test_sam_bbox_is_the_generators_box_from_the_rle():
    """The box every record carries, recomputed from an RLE, equals the generator's own
    (engine.mask_ops: inclusive corners), empty masks included."""
    import torch

    from engine.mask_ops import box_xyxy_to_xywh, masks_to_boxes_xyxy

    rng = np.random.default_rng(3)
    masks = np.zeros((6, 37, 53), bool)
    for m in masks[:5]:
        y, x = rng.integers(0, 30), rng.integers(0, 45)
        m[y : y + rng.integers(1, 8), x : x + rng.integers(1, 9)] = True
    masks[4, 0, 52] = True  # a second part at the far corner
    expected = box_xyxy_to_xywh(masks_to_boxes_xyxy(torch.from_numpy(masks))).numpy()
    got = rle.sam_bbox_xywh(rle.encode(masks))
    assert got.tolist() == expected.tolist() and got[5].tolist() == [0, 0, 0, 0]
