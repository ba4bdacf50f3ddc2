"""What model to run, without torch: `SamConfig` (one variant's hyper-parameters), the named
variants (`MODEL_REGISTRY`, `PACKAGED_CHECKPOINTS`) and `ModelConfig` (the `model:` config block).
A run's driver reads these; only the model actors build the model (`engine.model`)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of one SAM variant. Field names are the keys of a JSON model config."""

    encoder_type: str = "vit"
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    encoder_mlp_ratio: float = 4.0
    encoder_qkv_bias: bool = True
    encoder_use_rel_pos: bool = True
    encoder_use_abs_pos: bool = True
    encoder_layernorm_eps: float = 1e-6
    layernorm2d_eps_in_neck_and_upscaling: float = 1e-6
    encoder_options: dict[str, Any] = field(default_factory=dict)  # settings of non-ViT encoders
    prompt_embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)
    mask_in_chans: int = 16
    decoder_transformer_depth: int = 2
    decoder_transformer_mlp_dim: int = 2048
    decoder_transformer_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    @classmethod
    def from_json(cls, path: str | Path) -> "SamConfig":
        """Read a JSON model config (the parity fixture's `config.json` format, or a model
        round's `card.json`, whose `model_config` it is).

        Keys describing how a fixture was made (seeds, perturbation, crafting logs, checksums) are
        provenance, not architecture, and are ignored silently; any other unknown key is ignored with
        a warning naming it (a misspelt key then shows up there, and a checkpoint that needs it fails
        strict loading with the mismatching keys named).
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"model config {path}: cannot be read as JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"model config {path}: expected a JSON object of hyper-parameters")
        if isinstance(raw.get("model_config"), dict):  # a model round's card (engine.training)
            raw = raw["model_config"]
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> "SamConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in raw.items():
            if key in fields:
                values[key] = _tuples(value) if key != "encoder_options" else dict(value)
            elif not key.startswith(_PROVENANCE_PREFIXES):
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"model config {source}: ignoring unknown keys {sorted(unknown)}; known keys: "
                f"{', '.join(sorted(fields))}",
                stacklevel=3,
            )
        config = cls(**values)
        config.validate(source)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "<config>") -> None:
        """The checks that need no model code (`engine.model` checks the encoder type when it
        builds: encoders register there)."""
        grid = self.image_size // self.patch_size
        if self.encoder_type == "vit" and tuple(self.image_embedding_size) != (grid, grid):
            raise ValueError(
                f"model config {source}: image_embedding_size {list(self.image_embedding_size)} must be "
                f"image_size / patch_size = {grid} for the ViT encoder"
            )
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(
                f"model config {source}: encoder_global_attn_indexes {bad} outside 0..{self.encoder_depth - 1}"
            )


_PROVENANCE_PREFIXES = (
    "construction_",
    "perturbation",
    "decoder_crafting",
    "state_dict_",
    "notes",
    "comment",
)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


MODEL_REGISTRY: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
}


# The bundled model's architecture: MobileNetV2 encoder, SAM's prompt encoder and decoder with a
# narrower token MLP (1024 instead of 2048) to keep the packaged checkpoint small.
_LIGHT = dict(encoder_type="mobilenet_v2", decoder_transformer_mlp_dim=1024)
# "mobilenet_v2": the untrained starting point (ImageNet backbone, random neck and decoder);
# "default": the same network with the packaged round-0 weights (engine/weights/).
MODEL_REGISTRY["mobilenet_v2"] = SamConfig(
    **_LIGHT, encoder_options={"pretrained": True, "freeze_backbone": True}
)
MODEL_REGISTRY["default"] = SamConfig(**_LIGHT, encoder_options={"freeze_backbone": True})
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Registry names whose weights ship inside the package: build_sam(name) loads them by default.
PACKAGED_CHECKPOINTS: dict[str, Path] = {"default": WEIGHTS_DIR / "default_round0.pt"}


@dataclass
class ModelConfig:
    """The `model:` config block: which SAM to run and where.

    Attributes:
      model (str): a `MODEL_REGISTRY` key (default: the bundled model; vit_b, vit_l, vit_h, ...)
        or a JSON model config path.
      checkpoint (str | None): the state dict; None keeps random weights unless the registry entry
        brings its own packaged checkpoint.
      device (str): "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
      bf16 (bool): run under bfloat16 autocast (callers that honour it: predictor, generator).
      tf32 (bool): on CUDA, let convolutions and matrix products round their inputs to TF32.
        Off by default: PyTorch leaves it on for cuDNN's convolutions (SAM's patch embedding,
        neck and mask upscaling), which moves predicted IoUs by up to ~0.06 on the parity
        fixture and reorders candidates; in float32 a GPU gives the CPU's masks (predicted IoUs
        within ~1e-6). On: set B 0.64 -> 0.40 s on an H200, no gain on the SA-1B config.
        Process-wide (PyTorch's own switches).
    """

    model: str = "default"
    checkpoint: str | None = None
    device: str = "auto"
    bf16: bool = False
    tf32: bool = False


def model_facts(cfg: ModelConfig) -> dict[str, Any]:
    """The `model:` block as a run record keeps it, with the weights it loads: their path and
    sha256 (the given checkpoint, or the packaged one a named model brings; None: random
    weights), so every output names the exact weights that made it."""
    from engine.provenance import sha256_file

    path = cfg.checkpoint or PACKAGED_CHECKPOINTS.get(cfg.model)
    weights = None
    if path is not None and Path(path).expanduser().is_file():
        weights = {"path": str(path), "sha256": sha256_file(Path(path).expanduser())}
    return {**dataclasses.asdict(cfg), "weights": weights}
