"""The privacy stage on Ray: faces and plates blurred by `engine.privacy.PrivacyStage` in actors."""

from __future__ import annotations

from typing import Any

from sharding.store import PRIVACY_STAGE
from stages.steps import StageSpec


def make_privacy(config: Any):
    """The per-image function of one actor: detectors loaded once (`PrivacyStage.__init__`)."""
    from engine.privacy import PrivacyStage

    return PrivacyStage(config)


def privacy_spec(config: Any) -> StageSpec:
    """Arguments: config (PrivacyConfig): the `privacy:` block. GPUs are asked for only when
    the detectors run on CUDA (`device: cuda | auto`)."""
    return StageSpec(
        PRIVACY_STAGE, make_privacy, {"config": config}, uses_model=config.device != "cpu"
    )


def detector_metadata(config: Any) -> dict[str, Any]:
    """Detectors (weights, checksums, licences) and settings, for the run record. Building them
    here also checks, before any actor starts, that their weights are installed."""
    from engine.privacy import PrivacyStage

    return PrivacyStage(config).run_metadata()
