from dataclasses import dataclass

import pytest

from engine.cli.config import apply_overrides, load_config, section


@dataclass
class Params:
    points: int = 32
    thresh: float = 0.88
    crops: list | None = None


def test_overrides_parse_yaml_values_and_reject_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("amg:\n  points: 32\n  thresh: 0.88\n")
    config = load_config(path, ["amg.points=16", "amg.crops=[1, 2]"])
    params = section(config, "amg", Params)
    assert params == Params(points=16, thresh=0.88, crops=[1, 2])
    with pytest.raises(ValueError, match="unknown keys \\['pointz'\\]"):
        section(apply_overrides(config, ["amg.pointz=3"]), "amg", Params)
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(config, ["amg.points"])
    with pytest.raises(ValueError, match="not found"):
        load_config("no-such-config")
