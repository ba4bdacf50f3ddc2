"""The model registry, `sa-engine train` / `evaluate` end to end on a tiny model, the gate's
decision rule, and the bundled default model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.cli.main import app
from engine.model import PACKAGED_CHECKPOINTS, build_sam
from engine.training.gate import GateConfig, ModelScore, decide
from engine.training.registry import ModelRegistry
from tests.test_training import TINY

runner = CliRunner()
TRAIN_SET = [
    "--set", "train.steps=40", "--set", "train.rounds=3", "--set", "train.rounds_without_point=1",
    "--set", "train.masks_per_image=4", "--set", "train.warmup_steps=5", "--set", "train.lr=1e-3",
    "--set", "train.image_sizes=[256]", "--set", "train.log_every=10",
]
GATE_SET = ["--set", "train.gate.max_masks=8", "--set", "train.gate.max_clicks=5"]
DATA = ["--from", "synthetic", "--synthetic-scenes", "2", "--held-out-share", "0"]


def score(miou1: float, miou5: float, clicks: float) -> ModelScore:
    return ModelScore(miou1, miou5, clicks, 0.5, 10, 2, 0.0)


def test_decide_promotes_only_a_better_model():
    cfg = GateConfig()
    current = score(0.60, 0.80, 8.0)
    assert decide(score(0.62, 0.82, 7.0), current, cfg).promote
    assert not decide(score(0.60, 0.80, 8.0), current, cfg).promote  # equal is not better
    worse = decide(score(0.70, 0.85, 9.0), current, cfg)
    assert not worse.promote and "clicks_to_target" in worse.reason
    regress = decide(score(0.50, 0.80, 7.0), current, cfg)  # fewer clicks, but 1-click IoU fell
    assert not regress.promote and "miou_1click worse" in regress.reason
    assert decide(score(0.1, 0.1, 20.0), None, cfg).promote  # nothing to compare with
    with pytest.raises(ValueError, match="gate.primary"):
        GateConfig(primary="speed").validate()


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    """A store whose round 0 is a tiny model trained by the real `train` command."""
    root = tmp_path_factory.mktemp("store")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    result = runner.invoke(
        app,
        ["train", str(root), *DATA, "--round", "-1", "--init", str(config), "--threads", "1"]
        + TRAIN_SET,
        env={"RAY_ADDRESS": None},  # one process, whatever cluster the shell points at
    )
    assert result.exit_code == 0, result.output
    return root


def test_train_names_a_loss_trend_only_when_it_has_one(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    steps = [s if s != "train.steps=40" else "train.steps=2" for s in TRAIN_SET]
    steps = [s if s != "train.log_every=10" else "train.log_every=25" for s in steps]
    result = runner.invoke(
        app,
        ["train", str(tmp_path), *DATA, "--round", "-1", "--init", str(config),
         "--threads", "1"] + steps,
        env={"RAY_ADDRESS": None},
    )
    assert result.exit_code == 0, result.output
    assert "(the mean over all 2 steps; set train.log_every below train.steps" in result.output
    # the command it says to run next names the same data (it lacked --from: evaluate refused)
    assert (f"Judge it with `sa-engine evaluate {tmp_path} --candidate 0 --from synthetic "
            "--synthetic-scenes 2 --synthetic-seed ") in result.output  # fmt: skip
    assert "--held-out-share 0.0` before it is used." in result.output
    assert " -> " not in result.output.split("wrote model round")[1]


def test_train_writes_checkpoint_and_card(trained_store):
    registry = ModelRegistry(trained_store)
    assert registry.rounds() == [0]
    files = registry.files(0)
    card = json.loads(files.card.read_text())
    assert card["round"] == 0 and card["parent_round"] is None
    assert card["command"].startswith("sa-engine train ") and "--init" in card["command"]
    assert card["data"][0]["source"] == "synthetic" and card["data"][0]["images"] == 2
    assert card["training"]["steps"] == 40 and card["train_config"]["rounds"] == 3
    assert card["training"]["loss_last"] < card["training"]["loss_first"]
    assert card["distributed"] == {"workers": 1, "backend": None, "address": None}
    state = torch.load(files.checkpoint, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    sam = registry.load(0)  # rebuilt from the card's architecture, strict load
    assert sam.img_size == 256 and sam.prompt_encoder.embed_dim == 64


def test_gate_refuses_a_worse_round_and_promotes_a_better_one(tmp_path):
    """Round 0 of a fresh store is the bundled model; an untrained round must be refused against
    it, and once the untrained round is current, the bundled weights must win against it."""
    from engine.model import MODEL_REGISTRY

    registry = ModelRegistry(tmp_path)
    torch.manual_seed(0)
    registry.write_round(1, build_sam(MODEL_REGISTRY["default"]), {"note": "untrained"})
    args = ["--split", "all", *DATA, "--threads", "1"] + GATE_SET
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--candidate", "1", *args])
    assert result.exit_code == 0, result.output
    assert "REFUSED" in result.output and registry.current() == 0
    report = json.loads((registry.round_dir(1) / "gate-vs-round-0.json").read_text())
    assert report["promoted"] is False and report["against"] == 0
    bundled, untrained = report["scores"]["0"], report["scores"]["1"]
    assert bundled["miou_1click"] > untrained["miou_1click"] + 0.1
    assert registry.card(1)["evaluations"][0]["against"] == 0

    registry.promote(1, None, "test")
    registry.write_round(2, build_sam("default"), {"note": "the bundled weights"})
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--candidate", "2", *args])
    assert result.exit_code == 0, result.output
    assert "PROMOTED" in result.output and registry.current() == 2
    current = json.loads((registry.root / "current.json").read_text())
    assert current["report"].endswith("gate-vs-round-1.json")


def test_the_gate_never_scores_images_a_scored_round_trained_on(tmp_path, trained_store):
    """A held-out share larger than the one a round was trained with would score it on its own
    training images: `evaluate` reads the share from the rounds' cards (and those they were
    fine-tuned from) and refuses a larger one."""
    from engine.training.data import DataConfig
    from engine.training.gate import gate_held_out_share

    share_02 = ["--from", "synthetic", "--synthetic-scenes", "2", "--held-out-share", "0.2"]
    result = runner.invoke(
        app, ["evaluate", str(trained_store), "--candidate", "0", "--against", "none", *share_02]
    )
    assert result.exit_code == 1, result.output
    assert "held-out share 0.2 is larger than a scored round" in result.output
    assert "use --held-out-share 0 or less" in result.output  # round 0 was trained with share 0
    result = runner.invoke(
        app, ["evaluate", str(trained_store), "--candidate", "0", "--against", "none", *share_02[:4]]
    )  # the default share, read from the card: 0, so no image was held out
    assert result.exit_code == 1 and "no held-out images at share 0 (the scored rounds were" in result.output

    registry = ModelRegistry(tmp_path)
    sam = build_sam(TINY)

    def data(share: float) -> list[dict]:
        return [{"source": "synthetic", "split": "train", "held_out_share": share}]

    registry.write_round(0, sam, {"data": data(0.2), "parent_round": None})
    registry.write_round(1, sam, {"data": data(0.3), "parent_round": 0})  # fine-tuned from 0
    registry.write_round(2, sam, {"data": data(0.25), "parent_round": None,
                                  "lineage": [{"data": data(0.15)}]})  # fmt: skip
    registry.write_round(3, sam, {"parent_round": None})  # nothing recorded
    share = gate_held_out_share
    default = 0.05  # the config's
    assert share(registry, [1], None, default) == 0.2  # its parent's share
    assert share(registry, [1, 2], None, default) == 0.15  # round 2's first stage
    assert share(registry, [1], 0.1, default) == 0.1  # a smaller one is a subset
    with pytest.raises(ValueError, match="larger than a scored round"):
        share(registry, [1], 0.25, default)
    assert share(registry, [3], None, default) == 0.05  # the config's
    registry.write_round(4, sam, {"parent_round": 5})
    registry.write_round(5, sam, {"data": data(0.12), "parent_round": 4})  # a loop ends
    assert share(registry, [4], None, default) == 0.12
    # only the shares of the kind of images scored: a round trained on synthetic scenes at 0.02
    # and on store masks at 0.08 is scored on store images at 0.08
    both = [{"source": "synthetic", "split": "train", "held_out_share": 0.02},
            {"source": "store", "split": "train", "held_out_share": 0.08}]  # fmt: skip
    registry.write_round(6, sam, {"data": both, "parent_round": None})
    assert share(registry, [6], None, default, ["store"]) == 0.08
    assert share(registry, [6], None, default) == 0.02  # (any kind)
    assert share(registry, [1], None, default, ["coco"]) == default  # never trained on COCO
    with pytest.raises(ValueError, match=r"train.held_out_share=1 is invalid: use a share in \[0, 1\)"):
        DataConfig(held_out_share=1)


def test_train_errors_name_the_fix(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path), "--round", "0"])
    assert result.exit_code == 1 and "no training data" in result.output
    result = runner.invoke(
        app, ["train", str(tmp_path), "--from", "synthetic", "--address", "x:1", "--set", "train.workers=0"]
    )
    assert result.exit_code == 1 and "train.workers=0 is invalid" in result.output
    result = runner.invoke(app, ["train", str(tmp_path), "--from", "synthetic", "--round", "-1"])
    assert result.exit_code == 1 and "--init" in result.output
    result = runner.invoke(app, ["train", str(tmp_path), "--from", "synthetic", "--round", "4"])
    assert result.exit_code == 1 and "round 4 is not in" in result.output
    result = runner.invoke(app, ["train", str(tmp_path), "--from", "assisted"])
    assert result.exit_code == 1 and "not a store" in result.output


def test_bundled_default_model_loads_and_segments_a_demo_photo(demo_photos):
    """`build_sam("default")` needs no path; a click on the cat gives a mask around the click."""
    from engine.image_io import load_image
    from engine.predictor import SamPredictor

    assert PACKAGED_CHECKPOINTS["default"].is_file(), "the bundled checkpoint is missing"
    assert PACKAGED_CHECKPOINTS["default"].stat().st_size <= 25 * 2**20
    cat = [p for p in demo_photos if p.stem == "chelsea"]
    if not cat:
        pytest.skip("demo/photos/chelsea.jpg is absent")
    sam = build_sam("default")
    predictor = SamPredictor(sam)
    image = load_image(cat[0])
    predictor.set_image(image)
    assert tuple(predictor.features.shape) == (1, 256, 64, 64)
    point = np.array([[170.0, 110.0]])  # on the cat's left eye (451x300 photo)
    masks, scores, logits = predictor.predict(point, np.array([1]), multimask_output=True)
    best = masks[int(np.argmax(scores))]
    ys, xs = np.nonzero(best)
    assert xs.min() <= 170 <= xs.max() and ys.min() <= 110 <= ys.max(), "no mask around the click"
    assert 100 < best.sum() < 0.9 * best.size  # an eye-sized object, not a speck or the photo
    assert logits.shape == (3, 256, 256)


def test_gear_round_n_runs_model_round_n(tmp_path, parity_dir, capsys):
    """`--round N` of a gear picks the store's model round N; round 0 stays the config's model."""
    import typer

    from engine.cli.common import model_sets
    from engine.model import ModelConfig, load_model

    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    ModelRegistry(tmp_path).write_round(1, sam, {"parent_round": 0})
    assert model_sets(None, None, None, store=tmp_path, round_=0) == []
    sets = model_sets(None, None, None, store=tmp_path, round_=1)
    values = dict(s.split("=", 1) for s in sets)
    model = ModelConfig(json.loads(values["model.model"]), json.loads(values["model.checkpoint"]))
    assert model.model.endswith("round-1/card.json")
    loaded = load_model(ModelConfig(model.model, model.checkpoint, device="cpu"))
    weight = loaded.mask_decoder.iou_token.weight
    assert torch.allclose(weight, sam.mask_decoder.iou_token.weight.half().float())
    named = model_sets(["model.model=vit_b"], None, None, store=tmp_path, round_=1)
    assert named == ["model.model=vit_b"]  # a model named by the user wins
    # --round N runs round N, and says so when the gate has not let it through
    assert "warning: model round 1 has not been judged" in capsys.readouterr().err
    report = ModelRegistry(tmp_path).round_dir(1) / "gate-vs-round-0.json"
    report.write_text(json.dumps({"passes": False, "reason": "clicks_to_target worse"}))
    model_sets(None, None, None, store=tmp_path, round_=1)
    err = capsys.readouterr().err
    assert "warning: the gate refused model round 1 (clicks_to_target worse; report" in err
    ModelRegistry(tmp_path).promote(1, report, "now")
    model_sets(None, None, None, store=tmp_path, round_=1)
    assert "warning" not in capsys.readouterr().err  # the current round: nothing to say
    with pytest.raises(typer.Exit):
        model_sets(None, None, None, store=tmp_path, round_=2)
