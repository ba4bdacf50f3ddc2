"""The model registry of a store: one folder per model round, and which round is current.

Layout (every file written atomically):

    STORE/models/round-<K>/checkpoint.pt     plain state dict (floating tensors stored as fp16)
    STORE/models/round-<K>/card.json         the model card: architecture (`model_config`), parent
                                             round, data used, training recipe and run, metrics,
                                             the command that made it
    STORE/models/round-<K>/gate-vs-round-<J>.json   the gate's report comparing K with J
    STORE/models/current.json                {"round": K, "promoted_at": ..., "report": ...}

Round 0 is the bundled default model (`engine/weights/`) unless the store holds its own
`round-0/` folder. Without `current.json` the current round is 0. A new round is written by
`train` and becomes current only when `evaluate` promotes it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.atomic import atomic_write_bytes, atomic_write_json
from engine.model import PACKAGED_CHECKPOINTS, SamConfig, build_sam
from engine.modeling import Sam

BUNDLED_CARD = Path(__file__).resolve().parents[1] / "weights" / "default_round0.card.json"


@dataclass(frozen=True)
class RoundFiles:
    """Where one round's files are. `bundled` is True for the packaged round 0."""

    round: int
    checkpoint: Path
    card: Path
    bundled: bool = False


def save_state_dict_half(sam: Sam, path: str | Path) -> int:
    """Write the model's state dict with floating tensors as fp16 (half the size); returns bytes.

    `load_checkpoint` copies them into the fp32 parameters, so loading is unchanged.
    """
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
        for k, v in sam.state_dict().items()
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


def portable_config(sam: Sam) -> dict[str, Any]:
    """The model's SamConfig as a dict that rebuilds it from the checkpoint alone (the MobileNetV2
    backbone is inside the checkpoint, so the ImageNet weights file is not needed again)."""
    config = sam.config.to_dict()
    options = config.get("encoder_options") or {}
    if "pretrained" in options:
        config["encoder_options"] = {**options, "pretrained": False}
    return config


class ModelRegistry:
    """The `models/` folder of a store (it is created on the first write)."""

    def __init__(self, store_root: str | Path) -> None:
        self.root = Path(store_root) / "models"

    def round_dir(self, round_: int) -> Path:
        if round_ < 0:
            raise ValueError(f"model round {round_} is invalid: rounds are numbered from 0")
        return self.root / f"round-{round_}"

    def files(self, round_: int) -> RoundFiles:
        """The files of round `round_`; round 0 falls back to the bundled default model."""
        folder = self.round_dir(round_)
        if (folder / "card.json").is_file() and (folder / "checkpoint.pt").is_file():
            return RoundFiles(round_, folder / "checkpoint.pt", folder / "card.json")
        if round_ == 0:
            return RoundFiles(0, PACKAGED_CHECKPOINTS["default"], BUNDLED_CARD, bundled=True)
        known = ", ".join(str(r) for r in self.rounds()) or "only the bundled round 0"
        raise ValueError(
            f"model round {round_} is not in {self.root} (rounds there: {known}); train it with "
            f"`sa-engine train STORE --from GEAR --round {round_ - 1}`"
        )

    def rounds(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name.removeprefix("round-"))
            for p in self.root.glob("round-*")
            if p.name.removeprefix("round-").isdigit() and (p / "card.json").is_file()
        )

    def card(self, round_: int) -> dict[str, Any]:
        files = self.files(round_)
        if not files.card.is_file():
            return {"round": round_}
        return json.loads(files.card.read_text())

    def load(self, round_: int, device: str | torch.device | None = None) -> Sam:
        """Build round `round_`'s model from its card's architecture and load its checkpoint."""
        files = self.files(round_)
        if files.bundled:
            return build_sam("default", device=device)
        card = self.card(round_)
        if "model_config" not in card:
            raise ValueError(f"{files.card}: the card has no model_config; cannot rebuild round {round_}")
        config = SamConfig.from_dict(card["model_config"], source=str(files.card))
        return build_sam(config, files.checkpoint, device=device)

    def write_round(self, round_: int, sam: Sam, card: dict[str, Any]) -> RoundFiles:
        """Write checkpoint then card (a round counts once its card exists)."""
        folder = self.round_dir(round_)
        if (folder / "card.json").is_file():
            raise ValueError(
                f"model round {round_} already exists in {folder}: pick another --round or remove it"
            )
        size = save_state_dict_half(sam, folder / "checkpoint.pt")
        card = {"model_config": portable_config(sam), **card, "round": round_, "checkpoint_bytes": size}
        atomic_write_json(folder / "card.json", card, indent=1)
        return RoundFiles(round_, folder / "checkpoint.pt", folder / "card.json")

    def gate_warning(self, round_: int) -> str | None:
        """Why running round `round_` goes against the gate (None when it is current, or the
        bundled round 0): the gate refused it, or it was never judged."""
        if round_ == self.current() or self.files(round_).bundled:
            return None
        reports = sorted(self.round_dir(round_).glob("gate-vs-*.json"))
        refused = [p for p in reports if not json.loads(p.read_text()).get("passes")]
        if refused:
            reason = json.loads(refused[-1].read_text()).get("reason", "")
            return f"the gate refused model round {round_} ({reason}; report {refused[-1]})"
        if not reports:
            return (
                f"model round {round_} has not been judged: `sa-engine evaluate {self.root.parent} "
                f"--candidate {round_} ...` scores it on held-out masks"
            )
        return None  # it passed and was not promoted (evaluate --no-promote)

    def current(self) -> int:
        path = self.root / "current.json"
        if not path.is_file():
            return 0
        return int(json.loads(path.read_text())["round"])

    def promote(self, round_: int, report_path: Path | None, when: str) -> None:
        self.files(round_)  # must exist
        atomic_write_json(
            self.root / "current.json",
            {"round": round_, "promoted_at": when, "report": str(report_path) if report_path else None},
            indent=1,
        )
