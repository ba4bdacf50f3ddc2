"""Privacy stage: faces (RetinaFace) and licence plates (platedet) blurred before any release.

- `config.PrivacyConfig`: the `privacy:` config block.
- `detectors`: `Detection`, the detector interface and backends (`FACE_BACKENDS`, `PLATE_BACKENDS`).
- `retinaface`: the PyTorch RetinaFace and its one-time conversion from the TF frozen graph.
- `blur`: the irreversible region blur. `stage`: `PrivacyFilter` (one image), `PrivacyStage`
  (the shard runner's per-image callable), `run_privacy` (non-Ray store run).
"""

from engine.privacy.config import PrivacyConfig
from engine.privacy.detectors import Detection
from engine.privacy.stage import BlurResult, PrivacyFilter, PrivacyStage, run_privacy

__all__ = ["PrivacyConfig", "Detection", "BlurResult", "PrivacyFilter", "PrivacyStage", "run_privacy"]
