"""SA-1B export on Ray (`stages.export.RayExport`, `sa-engine export sa1b --ray`): the same release,
byte for byte, as the export in one process; kept tars on a re-run; a privacy output that fails
its sha256 stops the export naming its shard (or is skipped, named, with --allow-partial)."""

import json

import pytest
from typer.testing import CliRunner

from engine.cli.main import app
from sharding.export_sa1b import export_sa1b
from sharding.manifest import ingest
from sharding.runner import run_stage
from sharding.store import Store
from sharding.verify import verify_release
from stages.export import RayExport
from store_helpers import blur_stage, classical_stage

pytestmark = pytest.mark.slow


def _release(folder):
    """Every file of a release and its tars' records, release.json without its creation time."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    release = json.loads(files.pop("release.json"))
    del release["created"]
    return files, release


def test_ray_export_matches_the_local_one(tmp_path, local_ray, demo_photos):
    store = Store.create(tmp_path / "store")
    ingest(str(demo_photos[0].parent), store, shard_size=2)
    run_stage(store, "classical", 0, classical_stage)
    run_stage(store, "privacy", 0, blur_stage)
    local = export_sa1b(store, tmp_path / "local", short_side=200)
    on_ray = export_sa1b(store, tmp_path / "ray", short_side=200, cluster=RayExport())
    assert on_ray == local and local.tars == ["sa_000000.tar", "sa_000001.tar"]
    assert _release(tmp_path / "ray") == _release(tmp_path / "local")
    assert verify_release(tmp_path / "ray") == []
    again = export_sa1b(store, tmp_path / "ray", short_side=200, cluster=RayExport())
    assert again.reused == local.tars  # nothing changed: every tar kept

    # a privacy output changed after its commit (same size): the export stops naming its shard
    path = store.output_path("privacy", 0, "shard-000001", "images")
    changed = bytearray(path.read_bytes())
    changed[200] ^= 0xFF
    path.write_bytes(bytes(changed))
    with pytest.raises(ValueError, match="shard shard-000001: its privacy output .* failed its sha256"):
        export_sa1b(store, tmp_path / "ray2", cluster=RayExport())
    run_stage(store, "privacy", 0, blur_stage)  # redone: the record was set aside
    export_sa1b(store, tmp_path / "local2", short_side=200)  # (a new record: new inputs)

    # from the shell, on the Ray this process is connected to
    result = CliRunner().invoke(
        app, ["export", "sa1b", str(store.root), "--out", str(tmp_path / "cli"), "--ray",
              "--short-side", "200"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "-> " in result.output and "2 tars, 4 images" in result.output
    assert _release(tmp_path / "cli") == _release(tmp_path / "local2")
