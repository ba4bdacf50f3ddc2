"""A real multi-node Ray cluster on loopback for tests: `ray start` processes started and stopped
by pid (never `ray stop`, which kills every Ray process on the machine).

Every node runs under its own marker environment variable, inherited by all its processes
(raylet, object store, workers, agents), so a node is killed exactly: every process carrying its
marker gets SIGKILL, nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "SA_ENGINE_TEST_RAY_NODE"
# `ray start` on loopback. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every Ray process advertises
# and listens on 127.0.0.1 only, but the `ray start` command then refuses to start worker nodes
# (a check meant for laptops) and rewrites 127.0.0.1 to the machine's address. This launcher runs
# the same `ray start` with those two steps switched off; everything it starts sees the variable.
RAY_START = (
    "import sys; import ray._private.ray_constants as c; c.ENABLE_RAY_CLUSTER = True; "
    "import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for test cluster processes and their drivers: no token auth, repo importable."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    env.update(extra or {})
    return env


class LocalCluster:
    """A head node and worker nodes on 127.0.0.1, all logs and sockets in a temporary folder."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def start_node(
        self,
        name: str,
        num_cpus: int,
        head: bool = False,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start node `name` (`env`: more variables for all its processes) and wait until it runs."""
        args = [sys.executable, "-c", RAY_START, "start", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0"]
        args += ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false"]
            args += [f"--temp-dir={self.tmp}"]
        else:
            args += [f"--address={self.address}"]
        log = self.tmp / f"{name}.log"
        env = node_env({**(env or {}), MARKER: f"{self.tmp.name}-{name}", "RAY_TMPDIR": str(self.tmp)})
        if head:  # notice a dead node within ~3 s, not the default ~30 s
            env.update(
                RAY_health_check_period_ms="1000",
                RAY_health_check_timeout_ms="1000",
                RAY_health_check_failure_threshold="3",
            )
        self.nodes[name] = subprocess.Popen(
            args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def pids(self, name: str) -> list[int]:
        """Every live process of node `name`: the `ray start` process, its descendants, and any
        process carrying the node's marker (a worker whose parent already died)."""
        token = f"{MARKER}={self.tmp.name}-{name}".encode()
        children: dict[int, list[int]] = {}
        marked = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            if token in environ.split(b"\0"):
                marked.append(int(entry))
        proc = self.nodes.get(name)
        tree = [proc.pid] if proc is not None and proc.poll() is None else []
        for pid in tree:
            tree.extend(children.get(pid, []))
        return sorted(set(tree) | set(marked))

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of the node at once (a machine dying). Returns: how many."""
        killed = 0
        for _ in range(3):  # processes forked while we kill are caught by the next pass
            pids = self.pids(name)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.2)
        proc = self.nodes.pop(name, None)
        if proc is not None:
            proc.wait(timeout=10)
        return killed

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.kill_node(name)
        shutil.rmtree(self.tmp, ignore_errors=True)
