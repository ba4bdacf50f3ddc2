"""The PyTorch RetinaFace against the TensorFlow graph it was converted from.

TensorFlow is not installed (1.3 GB for one 6.6 MB graph), so the graph is evaluated here by a
small reference interpreter that follows TensorFlow's op definitions literally (NHWC, 'SAME'
padding computed from the op's own rule, half-pixel nearest resize, the graph's own anchors,
decoding and NMS), independently of the module's code. The module plus `priors`/`decode`/`nms`
must give the graph's final rows (box, 5 landmarks, score) on a real photo.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.image_io import load_image
from engine.privacy.detectors import package_file
from engine.privacy.graphdef import TF_DTYPES, read_graph
from engine.privacy.retinaface import NMS_IOU, decode, load_retinaface, nms, priors


def _same_pad(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _conv(x, kernel, strides, padding, depthwise):
    """TF Conv2D / DepthwiseConv2dNative on NHWC numpy arrays."""
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    kh, kw, cin, m = kernel.shape
    if depthwise:
        w = torch.from_numpy(
            np.ascontiguousarray(kernel.reshape(kh, kw, cin * m).transpose(2, 0, 1))
        )
        w, groups = w[:, None], cin
    else:
        w, groups = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))), 1
    sh, sw = strides[1], strides[2]
    if padding == "SAME":
        (pt, pb), (pl, pr) = _same_pad(x.shape[1], kh, sh), _same_pad(x.shape[2], kw, sw)
        t = F.pad(t, (pl, pr, pt, pb))
    return F.conv2d(t, w, stride=(sh, sw), groups=groups).numpy().transpose(0, 2, 3, 1)


def _strided_slice(x, begin, end, strides, a):
    index = []
    for i in range(len(begin)):
        bit = 1 << i
        if a["ellipsis_mask"] & bit:
            index.append(Ellipsis)
        elif a["new_axis_mask"] & bit:
            index.append(None)
        elif a["shrink_axis_mask"] & bit:
            index.append(int(begin[i]))
        else:
            b = None if a["begin_mask"] & bit else int(begin[i])
            e = None if a["end_mask"] & bit else int(end[i])
            index.append(slice(b, e, int(strides[i])))
    return np.asarray(x)[tuple(index)]


def _reference_nms(boxes, scores, max_out, iou, score_th):
    """tf.image.non_max_suppression: corners in any order, drop IoU > iou, score > threshold."""
    y0, x0 = np.minimum(boxes[:, 0], boxes[:, 2]), np.minimum(boxes[:, 1], boxes[:, 3])
    y1, x1 = np.maximum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 1], boxes[:, 3])
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] > score_th]
    keep = []
    for i in order:
        if len(keep) >= max_out:
            break
        ok = True
        for j in keep:
            ih = max(0.0, min(y1[i], y1[j]) - max(y0[i], y0[j]))
            iw = max(0.0, min(x1[i], x1[j]) - max(x0[i], x0[j]))
            inter = ih * iw
            union = (y1[i] - y0[i]) * (x1[i] - x0[i]) + (y1[j] - y0[j]) * (x1[j] - x0[j]) - inter
            if union > 0 and inter / union > iou:
                ok = False
                break
        if ok:
            keep.append(i)
    return np.asarray(keep, np.int32)


def run_graph(nodes, image: np.ndarray, output: str = "Identity") -> np.ndarray:
    """Evaluate the frozen graph on a 1xHxWx3 float32 image (values 0..255)."""
    cache: dict[str, object] = {}

    def value(ref: str):
        name, _, port = ref.partition(":")
        if port not in ("", "0"):
            raise NotImplementedError(ref)
        if name not in cache:
            cache[name] = evaluate(nodes[name])
        return cache[name]

    def evaluate(n):
        op, a = n.op, n.attrs
        ins = [value(i) for i in n.inputs]
        if op == "Placeholder":
            return image
        if op == "Const":
            return a["value"]
        if op == "Identity":
            return ins[0]
        if op in ("AddV2", "Sub", "Mul", "RealDiv"):
            f = {"AddV2": np.add, "Sub": np.subtract, "Mul": np.multiply, "RealDiv": np.divide}
            return f[op](ins[0], ins[1])
        if op == "Pad":
            return np.pad(ins[0], ins[1].tolist())
        if op in ("Conv2D", "DepthwiseConv2dNative"):
            return _conv(ins[0], ins[1], a["strides"], a["padding"], op != "Conv2D")
        if op == "FusedBatchNormV3":
            x, scale, offset, mean, var = ins
            return ((x - mean) / np.sqrt(var + np.float32(a["epsilon"])) * scale + offset).astype(
                np.float32
            )
        if op == "BiasAdd":
            return ins[0] + ins[1]
        if op == "Relu6":
            return np.clip(ins[0], 0, 6)
        if op == "Relu":
            return np.maximum(ins[0], 0)
        if op == "LeakyRelu":
            return np.where(ins[0] >= 0, ins[0], ins[0] * np.float32(a["alpha"]))
        if op == "ResizeNearestNeighbor":
            assert a["half_pixel_centers"] and not a["align_corners"]
            x, (oh, ow) = ins[0], ins[1]
            ih, iw = x.shape[1:3]
            ys = np.minimum(np.floor((np.arange(oh) + 0.5) * ih / oh).astype(int), ih - 1)
            xs = np.minimum(np.floor((np.arange(ow) + 0.5) * iw / ow).astype(int), iw - 1)
            return x[:, ys][:, :, xs]
        if op == "ConcatV2":
            return np.concatenate(ins[:-1], axis=int(ins[-1]))
        if op == "Shape":
            return np.asarray(np.shape(ins[0]), TF_DTYPES[a["out_type"]])
        if op == "StridedSlice":
            return _strided_slice(ins[0], ins[1], ins[2], ins[3], a)
        if op == "Pack":
            return np.stack(ins, axis=a["axis"])
        if op == "Reshape":
            return np.reshape(ins[0], ins[1])
        if op == "Cast":
            return np.asarray(ins[0]).astype(TF_DTYPES[a["DstT"]])
        if op == "Ceil":
            return np.ceil(ins[0])
        if op == "Range":
            return np.arange(ins[0], ins[1], ins[2]).astype(np.asarray(ins[0]).dtype)
        if op == "BroadcastTo":
            return np.broadcast_to(ins[0], ins[1]).copy()
        if op == "ExpandDims":
            return np.expand_dims(ins[0], int(ins[1]))
        if op == "Tile":
            return np.tile(ins[0], ins[1])
        if op == "Fill":
            return np.full(ins[0], ins[1])
        if op == "Softmax":
            e = np.exp(ins[0] - ins[0].max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)
        if op == "Exp":
            return np.exp(ins[0])
        if op == "NonMaxSuppressionV3":
            boxes, scores, max_out, iou, score_th = ins
            return _reference_nms(boxes, scores, int(max_out), float(iou), float(score_th))
        if op == "GatherV2":
            return np.take(ins[0], ins[1], axis=int(ins[2]))
        raise NotImplementedError(op)

    return value(output)


@pytest.fixture(scope="module")
def graph():
    return read_graph(package_file("retinaface", "src/frozen_graph.pb"))


def test_module_matches_the_tensorflow_graph_on_a_real_photo(graph, demo_photos, tmp_path):
    import cv2

    rgb = load_image(next(p for p in demo_photos if p.name == "astronaut.jpg"))
    rgb = cv2.resize(rgb, (320, 224), interpolation=cv2.INTER_AREA)  # small, and W != H
    x = rgb.astype(np.float32)[None]
    expected = run_graph(graph, x)  # rows: box XYXY, 5 landmarks (x, y), valid, score; 0..1
    assert expected.shape[1] == 16 and len(expected) >= 1 and expected[:, 15].max() > 0.9

    model, _ = load_retinaface(package_file("retinaface", "src/frozen_graph.pb"), tmp_path)
    with torch.inference_mode():
        enc, landmarks, scores = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    boxes, points = decode(enc[0], landmarks[0], priors(224, 320))
    s = scores[0].numpy()
    sel = np.flatnonzero(s > 0.5)
    keep = sel[nms(boxes.numpy()[sel], s[sel], NMS_IOU)]
    ours = np.concatenate(
        [boxes.numpy()[keep], points.numpy()[keep].reshape(-1, 10), np.ones((len(keep), 1)),
         s[keep, None]], axis=1)  # fmt: skip
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 1e-4
