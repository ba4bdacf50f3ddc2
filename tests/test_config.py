import dataclasses
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


@pytest.mark.parametrize("name", ["sa1b", "meta-default"])
def test_tool_blocks_of_the_configs_are_the_library_defaults(name):
    """The configs document the defaults: a store tool's block says what its dataclass does."""
    from engine.quality import QualityConfig
    from sharding.export_sa1b import ExportConfig
    from sharding.manifest import IngestConfig
    from stages.config import RayConfig

    config = load_config(name)
    for block, cls in [("ingest", IngestConfig), ("export", ExportConfig),
                       ("quality", QualityConfig), ("ray", RayConfig)]:  # fmt: skip
        assert set(config[block]) == {f.name for f in dataclasses.fields(cls)}, block
        assert section(config, block, cls) == cls(), block
