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


def test_a_misspelt_block_is_refused_not_ignored(tmp_path):
    """A block no command reads (`amgg.points_per_side`) would run with the default, as if the
    setting had been taken: refused, in --set and in a config file, naming the blocks."""
    from engine.cli.config import known_blocks

    blocks = {"model", "amg", "privacy", "ingest", "export", "quality", "ray", "train"}
    assert blocks <= known_blocks()
    with pytest.raises(ValueError, match=r"--set 'amgg.points_per_side=2': no block 'amgg' .*: amg, "):
        load_config("sa1b", ["amgg.points_per_side=2"])
    path = tmp_path / "mine.yaml"
    path.write_text("amg:\n  points_per_side: 8\nprivcy:\n  face_score: 0.9\n")
    with pytest.raises(ValueError, match=r"mine.yaml: unknown block\(s\) \['privcy'\]"):
        load_config(path)
    assert load_config("sa1b", ["train.gate.max_clicks=7"])["train"]["gate"]["max_clicks"] == 7


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


def test_values_of_the_wrong_type_are_named_not_passed_on():
    """A string where a number goes reached the stage and failed there with a traceback."""
    from engine.amg_config import AmgConfig
    from engine.privacy import PrivacyConfig
    from engine.training.trainer import TrainConfig
    from stages.config import RayConfig

    config = load_config("sa1b")
    for override, message in [
        ("ray.decode_cpus=abc", "ray.decode_cpus='abc' is invalid: use a finite number"),
        ("ray.num_cpus=true", "ray.num_cpus=True is invalid: use a whole number or null"),
        ("ray.model_actors=1.5", "ray.model_actors=1.5 is invalid: use a whole number or null"),
        ("ray.progress=1", "ray.progress=1 is invalid: use true or false"),
        ("ray.address=6379", "ray.address=6379 is invalid: use a string or null"),
    ]:
        with pytest.raises(ValueError, match=override.split("=")[0].replace(".", "\\.")) as err:
            section(apply_overrides(config, [override]), "ray", RayConfig)
        assert str(err.value) == message
    with pytest.raises(ValueError, match="config block 'ray' is 5: it must be a mapping"):
        section({"ray": 5}, "ray", RayConfig)
    with pytest.raises(ValueError, match=r"privacy.face_scales=\[1, 'x'\] is invalid: use a list of \(a finite number\)"):
        section(apply_overrides(config, ["privacy.face_scales=[1, x]"]), "privacy", PrivacyConfig)
    for override in ["ray.io_cpus=nan", "ray.io_cpus=.inf", "ray.io_cpus=.nan"]:
        with pytest.raises(ValueError, match="ray.io_cpus=.* is invalid: use a finite number"):
            section(apply_overrides(config, [override]), "ray", RayConfig)
    # the generator's own checks, on the driver before any model actor starts, named by block
    with pytest.raises(ValueError, match="config block 'amg': points_per_side must be >= 1, got -1"):
        section(apply_overrides(config, ["amg.points_per_side=-1"]), "amg", AmgConfig)
    with pytest.raises(ValueError, match="config block 'amg': output_mode must be one of"):
        section(apply_overrides(config, ["amg.output_mode=png"]), "amg", AmgConfig)
    # YAML 1.1 reads 8e-4 as a string: taken as the number it is; ints are numbers too
    ray = section(apply_overrides(config, ["ray.io_cpus=5e-1", "ray.decode_cpus=1"]), "ray", RayConfig)
    assert ray.io_cpus == 0.5 and ray.decode_cpus == 1
    train = section(apply_overrides({"train": {}}, ["train.lr=8e-4"]), "train", TrainConfig)
    assert train.lr == 8e-4
    with pytest.raises(ValueError, match="train.lr='fast' is invalid: use a finite number"):
        section(apply_overrides({"train": {}}, ["train.lr=fast"]), "train", TrainConfig)
    grids = "amg.point_grids=[[[0.5, 0.5]], [[0.25, 0.75]], [[0.5, 0.5]]]"
    amg = section(apply_overrides(config, [grids, "amg.points_per_side=null"]), "amg", AmgConfig)
    assert amg.point_grids[1] == [[0.25, 0.75]]


def test_every_block_names_a_value_out_of_range_the_same_way():
    """One form (`engine.checks.invalid`): the key as written in YAML or --set, the value, what
    it takes."""
    from engine.annotator import AnnotatorConfig
    from engine.gears.semi import SemiConfig
    from engine.privacy import PrivacyConfig
    from engine.training.gate import GateConfig
    from engine.training.trainer import TrainConfig

    for make, message in [
        (lambda: TrainConfig(lr=-1.0).validate(), "train.lr=-1.0 is invalid: use a learning rate > 0"),
        (lambda: TrainConfig(min_lr_ratio=2.0).validate(), "train.min_lr_ratio=2.0 is invalid"),
        (lambda: TrainConfig(log_every=0).validate(), "train.log_every=0 is invalid"),
        (lambda: GateConfig(first_choice="best").validate(), "train.gate.first_choice='best' is invalid"),
        (lambda: GateConfig(tolerance=-1).validate(), "train.gate.tolerance=-1 is invalid"),
        (lambda: AnnotatorConfig(time_limit_s=0), "annotate.time_limit_s=0 is invalid: use seconds > 0"),
        (lambda: SemiConfig(steps=0), "semi.steps=0 is invalid: use a whole number >= 1"),
        (lambda: PrivacyConfig(tile_overlap=200, tile_size=256), "privacy.tile_overlap=200 is invalid"),
    ]:
        with pytest.raises(ValueError) as err:
            make()
        assert str(err.value).startswith(message), str(err.value)
