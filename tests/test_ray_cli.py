"""`sa-engine run` from the shell with its default embedded Ray (loopback only), on real photos
with the real privacy detectors; and the CLI's clear errors."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli.main import app
from ray_cluster import node_env
from sharding.manifest import ingest
from sharding.status import last_run, status_lines
from sharding.store import PRIVACY_STAGE, Store
from stages.config import RayConfig
from stages.steps import object_store_mb

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_privacy_embedded(tmp_path, demo_photos):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in demo_photos[:2]:  # astronaut (a face) and chelsea (a cat)
        (folder / p.name).write_bytes(p.read_bytes())
    store = Store.create(tmp_path / "store")
    ingest(str(folder), store, shard_size=1)
    env = node_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # the command itself must keep Ray on loopback
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "engine.cli", "run", "privacy", str(store.root)]
    cmd += ["--set", "ray.model_actors=1", "--set", "privacy.face_scales=[1.0]"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 shard(s) committed" in done.stdout and "images 2, masks 0" in done.stdout
    (record_path,) = (store.root / "runs" / PRIVACY_STAGE).glob("*-round-0.json")
    record = json.loads(record_path.read_text())
    assert record["nodes"] == ["127.0.0.1"] and record["state"] == "finished"
    store_mb = object_store_mb(store, RayConfig())  # sized to these photos, not 30% of memory
    assert f"object store {store_mb} MiB" in record["where"]
    assert record["cluster"]["object_store_memory"] == pytest.approx(store_mb * 2**20, rel=0.01)
    assert record["plan"]["actors"] == 1 and set(record["meta"]["detectors"]) == {"face", "plate"}
    faces = {}
    for shard in store.shards():
        for image_id, data, meta in store.iter_output_images(PRIVACY_STAGE, 0, shard):
            faces[image_id] = meta["faces"]
    assert sorted(faces) == [1, 2] and faces[1] >= 1  # astronaut.jpg sorts first: id 1


def test_run_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["run", "classical", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "not a store" in result.output
    store = Store.create(tmp_path / "store")
    result = runner.invoke(app, ["run", "classical", str(store.root), "--set", "ray.batch_size=0"])
    assert result.exit_code == 1 and "ray.batch_size=0 is invalid" in result.output
    result = runner.invoke(app, ["run", "classical", str(store.root), "--set", "ray.gpus=2"])
    assert result.exit_code == 1 and "unknown keys ['gpus']" in result.output
    result = runner.invoke(
        app, ["run", "auto", str(store.root), "--checkpoint", str(tmp_path / "none.pth")]
    )
    assert result.exit_code == 1 and "does not exist" in result.output
    # a model without weights would write noise as gear-3 masks; an unknown one is named as such
    result = runner.invoke(app, ["run", "auto", str(store.root), "--model", "vit_b"])
    assert result.exit_code == 1 and "'vit_b' has no bundled weights" in result.output
    assert "--random-weights runs an untrained model" in result.output
    result = runner.invoke(app, ["run", "auto", str(store.root), "--model", "vit_x"])
    assert result.exit_code == 1 and "unknown model 'vit_x'" in result.output
    assert "embedded local Ray" not in result.output
    # a shard that is not there, and a cluster address nothing answers at: named at once, before
    # any Ray starts (ray.init retries an unanswered address for minutes)
    result = runner.invoke(app, ["run", "classical", str(store.root), "--shard", "shard-000009"])
    assert result.exit_code == 1 and "['shard-000009'] are not in" in result.output
    assert "embedded local Ray" not in result.output
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # (nothing listens there now)
    for address in [f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"]:
        result = runner.invoke(app, ["run", "classical", str(store.root), "--address", address])
        assert result.exit_code == 1 and f"no Ray cluster answers at {address}" in result.output


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, demo_photos, parity_dir):
    """`kill` (a scheduler's stop) mid-run: exit 143, the record says `stopped` (Ray's own
    handler made the driver die at once, leaving it `running`), and the same command goes on."""
    import os
    import signal
    import time

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in demo_photos[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    store = Store.create(tmp_path / "store")
    ingest(str(folder), store, shard_size=1)
    env = node_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "engine.cli", "run", "auto", str(store.root), "--model",
           str(parity_dir / "config.json"), "--checkpoint", str(parity_dir / "sam_small.pth"),
           "--set", "amg.points_per_side=4", "--set", "amg.crop_n_layers=0",
           "--set", "ray.progress=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = store.root / "runs" / "auto"

    def committed() -> int:  # the shards the run's record says it committed (written after each)
        for path in runs.glob("*-round-0.json"):
            try:
                return len(json.loads(path.read_text())["processed"])
            except (OSError, ValueError, KeyError):
                pass
        return 0

    deadline = time.time() + 240
    while not committed() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert b"auto round 0: stopped; committed shards stay" in err
    (path,) = (store.root / "runs" / "auto").glob("*-round-0.json")
    record = json.loads(path.read_text())
    assert record["state"] == "stopped" and record["finished_at"]
    assert 1 <= len(record["processed"]) < 4, "the signal must land mid-run"
    assert any("was stopped (Ctrl-C or SIGTERM)" in line for line in status_lines(store))
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{4 - len(record['processed'])} shard(s) committed, {len(record['processed'])} already done" in again.stdout
    assert last_run(store, "auto", 0)["state"] == "finished"
    assert not list((store.root / "runs").rglob("*.lock"))  # the runs' locks went with them


@pytest.mark.slow
def test_a_damaged_shard_file_stops_a_run_at_once_naming_it(tmp_path, demo_photos):
    """A shard file cut short: the run stops at the first attempt (another would read the same
    bytes) in one line naming the file and --shard; `status --verify` names it and exits 1. It
    used to make every attempt and end on Ray's multi-line RayTaskError(ArrowInvalid)."""
    store = Store.create(tmp_path / "store")
    ingest(str(demo_photos[0].parent), store, shard_size=2)
    damaged = store.shard_path("shard-000001")
    damaged.write_bytes(damaged.read_bytes()[:3000])
    env = node_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "engine.cli", "run", "classical", str(store.root)]
    done = subprocess.run(cmd + ["--set", "ray.progress=false"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: classical round 0: {damaged} is damaged (ArrowInvalid: "), last
    assert "Not tried again" in last and "--shard" in last
    (path,) = (store.root / "runs" / "classical").glob("*-round-0.json")
    assert [f["attempt"] for f in json.loads(path.read_text())["failures"]] == [1]
    result = CliRunner().invoke(app, ["status", str(store.root), "--verify"])
    assert result.exit_code == 1 and f"DAMAGED shard-000001: {damaged} is damaged" in result.output
    assert "shard-000000" not in result.output.split("DAMAGED", 1)[1]
