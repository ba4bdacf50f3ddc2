"""Model structure: parameter names/shapes equal Meta's official checkpoints; strict loading; configs."""

import json

import pytest
import torch

from engine.model import MODEL_REGISTRY, CheckpointMismatchError, SamConfig, build_sam


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_matches_official_manifest(parity_dir, variant):
    manifest = json.loads((parity_dir / "official_sam_checkpoint_manifest.json").read_text())[
        variant
    ]
    model = build_sam(variant, device="meta")
    state = model.state_dict()
    expected = manifest["state_dict"]
    assert sorted(state) == sorted(expected)
    for key, spec in expected.items():
        assert list(state[key].shape) == spec["shape"], key
        assert str(state[key].dtype) == f"torch.{spec['dtype']}", key
    assert len(state) == manifest["num_tensors"]
    assert sum(t.numel() for t in state.values()) == manifest["num_params"]
    buffers = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} - {
        k.rsplit(".", 1)[-1] for k in state
    }
    assert buffers == set(manifest["non_persistent_buffers_not_in_checkpoint"])


def test_fixture_checkpoint_loads_strictly_from_config(parity_dir):
    model = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    assert not model.training
    assert model.config.encoder_embed_dim == 64 and model.config.decoder_transformer_mlp_dim == 1024
    state = torch.load(parity_dir / "sam_small.pth", map_location="cpu", weights_only=True)
    assert torch.equal(
        model.state_dict()["image_encoder.pos_embed"], state["image_encoder.pos_embed"]
    )


def test_mismatched_checkpoint_names_keys_and_variant(parity_dir, tmp_path):
    with pytest.raises(CheckpointMismatchError) as info:
        build_sam("vit_b", checkpoint=parity_dir / "sam_small.pth")
    message = str(info.value)
    assert "vit_b" in message and "missing keys" in message and "image_encoder.blocks.10" in message
    assert (
        "shape mismatches" in message
        and "looks like a ViT encoder of width 64 and depth 4" in message
    )

    state = torch.load(parity_dir / "sam_small.pth", map_location="cpu", weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"1 missing keys \[mask_decoder.iou_token.weight\].*1 unexpected keys \[extra.weight\]",
    ):
        build_sam(parity_dir / "config.json", checkpoint=tmp_path / "edited.pth")


def test_unknown_model_and_bad_config_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'vit_x'.*vit_b, vit_l, vit_h"):
        build_sam("vit_x")
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "encoder_depth": 2,
                "encoder_global_attn_indexes": [1],
                "encoder_dept": 3,
                "perturbation": {"seed": 1},
            }
        )
    )
    with pytest.warns(UserWarning, match="ignoring unknown keys \\['encoder_dept'\\]"):
        assert build_sam(bad).config.encoder_depth == 2
    bad.write_text(json.dumps({"encoder_depth": 2}))
    with pytest.raises(
        ValueError, match="encoder_global_attn_indexes \\[2, 5, 8, 11\\] outside 0..1"
    ):
        build_sam(bad)
    bad.write_text(json.dumps({"encoder_type": "resnet"}))
    with pytest.raises(ValueError, match="encoder_type 'resnet' is not registered"):
        build_sam(bad)
    with pytest.raises(ValueError, match="model config .*missing.json does not exist"):
        build_sam(tmp_path / "missing.json")
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "train.pth")
    with pytest.raises(CheckpointMismatchError, match="not a plain state dict.*'model' entry"):
        build_sam("vit_b", checkpoint=tmp_path / "train.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_sam(
            SamConfig(encoder_depth=1, encoder_global_attn_indexes=(0,)),
            checkpoint=tmp_path / "nope.pth",
        )


def test_config_roundtrip_builds_any_dims(tmp_path):
    config = SamConfig(
        image_size=512,
        image_embedding_size=(32, 32),
        window_size=7,
        encoder_embed_dim=48,
        encoder_depth=3,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(2,),
        mask_in_chans=8,
        decoder_transformer_depth=1,
        decoder_transformer_mlp_dim=64,
        decoder_transformer_num_heads=4,
        iou_head_hidden_dim=32,
    )
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config.to_dict()))
    model = build_sam(path)
    assert model.config == config
    with torch.no_grad():
        embedding = model.image_encoder(torch.zeros(1, 3, 512, 512))
    assert embedding.shape == (1, 256, 32, 32)
    assert set(MODEL_REGISTRY) == {"vit_b", "vit_l", "vit_h", "mobilenet_v2", "default"}


class _PoolEncoder(torch.nn.Module):
    """A stand-in light encoder: strided pooling + 1x1 conv to the prompt embedding width."""

    def __init__(self, out_chans: int, stride: int) -> None:
        super().__init__()
        self.pool = torch.nn.AvgPool2d(stride)
        self.proj = torch.nn.Conv2d(3, out_chans, 1)

    def forward(self, x):
        return self.proj(self.pool(x))


def test_other_encoder_types_plug_in_through_the_registry(monkeypatch, tmp_path):
    import numpy as np

    from engine.model import ENCODER_BUILDERS
    from engine.predictor import SamPredictor

    monkeypatch.setitem(
        ENCODER_BUILDERS,
        "pool",
        lambda c: _PoolEncoder(c.prompt_embed_dim, c.encoder_options["stride"]),
    )
    path = tmp_path / "pool.json"
    path.write_text(
        json.dumps(
            {
                "encoder_type": "pool",
                "encoder_options": {"stride": 16},
                "decoder_transformer_mlp_dim": 64,
            }
        )
    )
    model = build_sam(path)
    assert isinstance(model.image_encoder, _PoolEncoder)
    assert "image_encoder.proj.weight" in model.state_dict()
    predictor = SamPredictor(model)
    predictor.set_image(np.full((60, 80, 3), 128, np.uint8))
    masks, scores, _ = predictor.predict(np.array([[10.0, 10.0]]), np.array([1]))
    assert masks.shape == (3, 60, 80) and scores.shape == (3,)


def shaped_like(variant: str, path):
    """A checkpoint with every key and shape of `variant`, a few KB: each tensor is a view of
    one zero (torch.save keeps the view over its one-element storage)."""
    zero = torch.zeros(1)
    state = build_sam(variant, device="meta").state_dict()
    torch.save({k: zero.expand(v.shape) for k, v in state.items()}, path)
    return path


def test_a_checkpoint_names_the_architecture_it_fits(parity_dir, tmp_path):
    from engine.model import PACKAGED_CHECKPOINTS, fitting_variant

    assert fitting_variant(shaped_like("vit_l", tmp_path / "l.pth")) == "vit_l"
    assert fitting_variant(PACKAGED_CHECKPOINTS["default"]) == "default"
    assert fitting_variant(parity_dir / "sam_small.pth") is None  # its own dims: --model CONFIG


def test_a_file_that_is_no_checkpoint_says_so(tmp_path, demo_photos):
    with pytest.raises(CheckpointMismatchError, match="is not a PyTorch checkpoint .*neither"):
        build_sam("vit_b", checkpoint=demo_photos[0])
    (tmp_path / "code.pth").write_bytes(b"\x80\x04\x95")  # a broken pickle
    with pytest.raises(CheckpointMismatchError, match="cannot be read as a torch state dict"):
        build_sam("vit_b", checkpoint=tmp_path / "code.pth")
