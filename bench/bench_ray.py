"""Ray pipeline vs one plain process: the automatic gear (gear 3) on real photos.

    python bench/bench_ray.py                      # 20, 50, 200 images, parity fixture model
    python bench/bench_ray.py --sizes 20 200 --points-per-side 8 --stage classical
    python bench/bench_ray.py --sizes 50 --ray block_images=10 --ray idle_workers=null  # ray: keys
    python bench/bench_ray.py --sizes 20 --cluster     # Ray runs join a running local cluster
    python bench/bench_ray.py --sizes 20 200 --photos 20  # the same 20 photos, cycled: memory vs N
    python bench/bench_ray.py --sizes 20 --repeat 5  # five pairs: the median ratio and its spread

For each image count N it builds a store of N real photos (demo/photos + ../shared/data/images/coco,
downscaled to --short-side px and, where N exceeds the photos at hand, repeated with a one-pixel
change so the store keeps every copy), then runs the same per-image work twice, each in a fresh
subprocess: `sharding.run_stage` in one plain process, and `stages.run_pipeline` on an embedded
local Ray (model actors sized from the machine), each timed from the stage's start to its last
commit, loading included: the plain process imports torch and loads one model inside its time,
each actor does the same inside the pipeline's (starting Ray itself, and the driver's own
imports, are the ray+init column). It prints the throughput of both, their ratio
(target >= 0.9) and the peak memory of each run's whole process tree (sum of PSS, so Ray's shared
object store is counted once), which should stay flat as N grows, and the high-water mark of
resident memory the kernel keeps for the plain process and for the largest model actor (VmHWM: a
true peak, where the once-a-second PSS sample may or may not catch an image's busiest moment),
and the CPU seconds each run's process tree used, whole command (imports and Ray's start
included); `--breakdown` splits Ray's by role (driver, model actors, Ray Data's helper actors,
task workers, Ray's daemons): where a Ray run's extra time goes on a machine with few cores; and
the largest VmHWM of one process of each role: whether a process grows with the image count or
only the number of processes a PSS sample catches; it also splits the peak by kind of page (anon
heap, mapped files, shmem such as Ray's object store) and sums every process's VmHWM (a total
that no sampling moment decides, shared library pages counted once per process).

One pair of runs at 20 images swings by +-0.1 in ratio on a shared 2-core machine (the plain
run's own speed moves that much between minutes); `--repeat N` runs N pairs per size, the two
modes' order alternating, and prints each pair and the median ratio with its range.

With `--cluster` the Ray runs join a cluster started once beforehand (`ray start --head` on
loopback, this machine's CPUs, `RAY_num_workers_soft_limit` = `idle_workers`), as
`sa-engine run auto STORE --address ...` does on a cluster, instead of each starting an embedded
Ray. One unmeasured 4-image run goes first, so the cluster has run a command before (Ray Data's
detached helper actors are up, as on a cluster in use). The cluster's own processes are counted
with each run: their memory, and the CPU they use during it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "sam_parity"


def photos() -> list[Path]:
    found = sorted((ROOT / "demo" / "photos").glob("*.jpg"))
    found += sorted((SHARED / "data" / "images").glob("*/*.jpg"))
    return found


def make_folder(folder: Path, count: int, short_side: int, distinct: int | None = None) -> None:
    """`count` distinct JPEGs made from the real photos (downscaled; copies differ by one pixel),
    cycling through the first `distinct` of them (None: all)."""
    import numpy as np
    from PIL import Image

    from engine.image_io import load_image

    sources = photos()
    if len(sources) < 20:
        raise SystemExit(f"need >= 20 real photos, found {len(sources)} (is {SHARED} there?)")
    sources = sources[:distinct] if distinct else sources
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = sources[i % len(sources)]
        rgb = load_image(source.read_bytes(), name=str(source)).copy()
        h, w = rgb.shape[:2]
        scale = short_side / min(h, w)
        if scale < 1:
            rgb = np.asarray(
                Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            ).copy()
        rgb[0, 0] = (i % 256, (i // 256) % 256, 17)  # copies of a photo stay distinct images
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG", quality=92)
        (folder / f"photo_{i:04d}.jpg").write_bytes(buffer.getvalue())


def stage_parts(args):
    """(stage name, StageSpec, factory of the plain per-image function) for --stage."""
    from stages.classical import classical_spec, make_classical

    if args.stage == "classical":
        return "classical", classical_spec(), make_classical
    from engine.amg_config import AmgConfig
    from engine.model_config import ModelConfig
    from stages.auto import auto_spec, finish_auto, make_auto

    model = ModelConfig(model=str(FIXTURE / "config.json"), checkpoint=str(FIXTURE / "sam_small.pth"))
    amg = AmgConfig(points_per_side=args.points_per_side, pred_iou_thresh=0.5,
                    stability_score_thresh=0.5)
    spec, _ = auto_spec(model, amg)

    def plain():
        fn = make_auto(**spec.make_kwargs)
        return lambda row, rgb: finish_auto(row, fn(row, rgb))

    return "auto", spec, plain


def one_run(args) -> None:
    """Child process: one measured run; prints a JSON line."""
    from sharding.manifest import ingest
    from sharding.store import Store

    store = Store.create(Path(args.store))
    if not store.shards():
        ingest(args.folder, store, shard_size=args.shard_size)
    images = len(store.manifest())
    t0 = time.perf_counter()
    if args.one == "plain":
        # From before the stage's imports: torch is loaded once in each process that runs the
        # model, here and in each model actor (whose loading counts in run_pipeline's time).
        name, spec, plain = stage_parts(args)
        from sharding.runner import run_stage

        setup = 0.0
        report = run_stage(store, name, 0, plain())
        seconds, masks = time.perf_counter() - t0, report.annotations
    else:
        name, spec, plain = stage_parts(args)
        from stages.cluster import ray_session
        from stages.config import RayConfig
        from stages.pipeline import run_pipeline

        from engine.cli.config import apply_overrides

        overrides = apply_overrides({}, args.ray)  # the CLI's --set parsing, without "ray."
        config = RayConfig(
            progress=False, object_store_mb=args.object_store_mb, address=args.address, **overrides
        )
        with ray_session(config, store) as where:
            setup = time.perf_counter() - t0
            record = run_pipeline(store, spec, 0, config, where=where)
        seconds, masks = record["seconds"], record["annotations"]
    print(json.dumps({"images": images, "seconds": seconds, "setup": setup, "masks": masks}))


@dataclass
class TreeSample:
    """What `watch` saw of one run's process tree."""

    result: dict  # the run's JSON line
    peak_gib: float  # summed PSS of the whole tree at the largest sample
    peak_parts: dict[str, tuple[int, int]]  # that sample: process name -> (processes, KiB)
    peak_kinds: dict[str, int]  # that sample's PSS by kind of page (anon, file, shmem), KiB
    hwm: dict[str, int]  # per process name the largest VmHWM (KiB): a true per-process peak
    cpu: dict[int, tuple[str, float]]  # pid -> (last name seen, CPU seconds last seen)
    hwm_sum_gib: float  # every process's VmHWM summed: no sampling moment, shared pages in each


def watch(proc: subprocess.Popen, others: Callable[[], list[int]] | None = None) -> TreeSample:
    """Wait for `proc`, sampling its whole process tree and the processes `others` lists (a
    running cluster's): the summed PSS once a second (reading every process's smaps costs CPU),
    and each process's CPU time five times a second (cheap: its stat line), so a process that
    ends is counted to within 0.2 s of its end. Of processes running before `proc` started, only
    the CPU time they use from then on counts."""
    peak: list = [0, {}, {}]
    marks: dict[int, tuple[str, int]] = {}  # pid -> (name, largest VmHWM seen)
    cpu: dict[int, tuple[str, float]] = {}
    others = others or list
    before = {pid: cpu_seconds(pid) or 0.0 for pid in others()}

    def sample() -> None:
        ticks = 0
        while proc.poll() is None:
            pids = tree_pids(proc.pid) + [pid for pid in others() if pid != proc.pid]
            for pid in pids:
                seconds = cpu_seconds(pid)
                if seconds is not None:
                    name = process_name(pid)
                    if name == "?" and pid in cpu:  # (an exiting process has no command line)
                        name = cpu[pid][0]
                    cpu[pid] = (name, seconds - before.get(pid, 0.0))
            if ticks % 5 == 0:
                total, parts, seen, kinds = tree_pss(pids)
                if total > peak[0]:
                    peak[:] = [total, parts, kinds]
                for pid, (name, kib) in seen.items():
                    old_name, old = marks.get(pid, (name, 0))
                    marks[pid] = (old_name if name == "?" else name, max(old, kib))
            ticks += 1
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{err[-3000:]}")
    hwm: dict[str, int] = {}
    for name, kib in marks.values():
        hwm[name] = max(hwm.get(name, 0), kib)
    total_hwm = sum(kib for _, kib in marks.values()) / 2**20
    result = json.loads(out.strip().splitlines()[-1])
    return TreeSample(result, peak[0] / 2**20, peak[1], peak[2], hwm, cpu, total_hwm)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid` so far (None: it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Ray Data's cluster-wide helper actors: detached, so a long-running cluster starts them once,
# while an embedded local Ray starts them (a worker process each) in every command.
RAY_DATA_HELPERS = (
    "ray::_StatsActor", "ray::_AutoscalingCoordinatorActor", "ray::ActorLocationTracker"
)


ROLES = ("driver", "model actors", "Ray Data helpers", "task workers", "Ray daemons")


def role(name: str, driver: bool) -> str:
    """A Ray run's process by what it does: the driver (the measured process: imports, Ray's
    start and Ray Data's executor), model actors, Ray Data's helper actors, task workers (reads,
    decodes, post-processing, idle), and Ray's own daemons (GCS, raylet, dashboard, agents, log
    monitor)."""
    if driver:
        return "driver"
    if "ModelActor" in name:
        return "model actors"
    if name in RAY_DATA_HELPERS:
        return "Ray Data helpers"
    if name.startswith("ray::") or "default_worker" in name:
        return "task workers"
    return "Ray daemons"


def cpu_roles(sample: TreeSample, root: int) -> dict[str, float]:
    """The run's CPU seconds by `role`."""
    roles = dict.fromkeys(ROLES, 0.0)
    for pid, (name, seconds) in sample.cpu.items():
        roles[role(name, pid == root)] += seconds
    return roles


def hwm_roles(sample: TreeSample) -> dict[str, float]:
    """The largest VmHWM (GiB) of one process of each `role` (a process is known by its name
    here, so a task worker counts under each name Ray gave it: the largest is its own peak)."""
    roles = dict.fromkeys(ROLES, 0.0)
    for name, kib in sample.hwm.items():
        key = role(name, name == "python bench_ray.py")
        roles[key] = max(roles[key], kib / 2**20)
    return roles


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def process_name(pid: int) -> str:
    """A short name: Ray's own title for its workers (`ray::ModelActor`, `ray::IDLE`), else the
    program's base name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    name = os.path.basename(first.split()[0]) if first else "?"
    if name.startswith("python") and len(argv) > 1:  # the driver, the dashboard, ray's helpers
        script = next((a.decode() for a in argv[1:] if a and not a.startswith(b"-")), "")
        name = f"python {os.path.basename(script)}" if script else name
    return name


def status_kib(pid: int | str, field: str) -> int | None:
    """A memory field of /proc/PID/status (e.g. "VmHWM", "VmRSS"), KiB; pid "self": this one."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


PAGE_KINDS = {"Pss_Anon:": "anon", "Pss_File:": "file", "Pss_Shmem:": "shmem"}


def tree_pss(
    pids: list[int],
) -> tuple[int, dict[str, tuple[int, int]], dict[int, tuple[str, int]], dict[str, int]]:
    """Summed PSS (KiB) of `pids`, per process name (count, KiB), per pid its name and VmHWM
    (KiB), and the sum by kind of page (`PAGE_KINDS`: a process's heap, mapped files such
    as its libraries, shared memory such as Ray's object store), KiB."""
    total, parts, marks, kinds = 0, {}, {}, dict.fromkeys(PAGE_KINDS.values(), 0)
    for pid in pids:
        try:
            name = process_name(pid)
            hwm = status_kib(pid, "VmHWM")
            if hwm is not None:
                marks[pid] = (name, hwm)
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                field, _, rest = line.partition(" ")
                if field == "Pss:":
                    kib = int(rest.split()[0])
                    total += kib
                    count, size = parts.get(name, (0, 0))
                    parts[name] = (count + 1, size + kib)
                elif field in PAGE_KINDS:
                    kinds[PAGE_KINDS[field]] += int(rest.split()[0])
        except OSError:
            pass
    return total, parts, marks, kinds


def breakdown(parts: dict[str, tuple[int, int]]) -> str:
    return ", ".join(
        f"{name} x{count} {kib / 2**20:.2f}"
        for name, (count, kib) in sorted(parts.items(), key=lambda kv: -kv[1][1])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 200])
    parser.add_argument("--stage", choices=["auto", "classical"], default="auto")
    parser.add_argument("--points-per-side", type=int, default=4)
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--object-store-mb", type=int, default=None, help="ray.object_store_mb")
    parser.add_argument("--ray", action="append", default=[], metavar="KEY=VALUE",
                        help="a ray: config key for the Ray runs, e.g. block_images=4 (repeatable)")
    parser.add_argument("--breakdown", action="store_true",
                        help="print each run's peak PSS per process name (GiB), and the Ray "
                        "run's CPU seconds and largest process HWM by role")
    parser.add_argument("--photos", type=int, default=None,
                        help="cycle through only this many distinct photos (default: all): a "
                        "run's memory then depends on the image count, not on its largest photo")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of runs per size (order alternating); prints the median ratio")
    parser.add_argument("--cluster", action="store_true",
                        help="the Ray runs join a local cluster started once (ray start --head)")
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=["plain", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_run(args)
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"stage {args.stage}, points_per_side {args.points_per_side}, photos downscaled to "
          f"{args.short_side} px, {os.cpu_count()} CPUs, shard size {args.shard_size}"
          + (f", ray: {' '.join(args.ray)}" if args.ray else "")
          + (f", {args.photos} distinct photos cycled" if args.photos else ""))
    cluster = start_cluster(args) if args.cluster else None

    def run(mode: str, store: str, folder: Path) -> tuple[TreeSample, int]:
        cmd = [sys.executable, __file__, "--one", mode, "--store", store, "--folder", str(folder),
               "--stage", args.stage, "--points-per-side", str(args.points_per_side),
               "--shard-size", str(args.shard_size)]
        if args.object_store_mb:
            cmd += ["--object-store-mb", str(args.object_store_mb)]
        for pair in args.ray:
            cmd += ["--ray", pair]
        others, run_env = None, env
        if cluster is not None and mode == "ray":
            cmd += ["--address", cluster.address]
            others = lambda: cluster.pids("head")  # noqa: E731
            run_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # the driver on loopback too
        proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        return watch(proc, others), proc.pid

    try:
        with tempfile.TemporaryDirectory(prefix="bench_ray") as tmp:
            if cluster is not None:
                make_folder(Path(tmp) / "warm-up", 4, args.short_side)
                warm, _ = run("ray", f"{tmp}/warm-up-store", Path(tmp) / "warm-up")
                print(f"cluster {cluster.address} warmed up by a 4-image run "
                      f"({warm.result['seconds']:.1f} s)", flush=True)
            compare(args, tmp, run)
    finally:
        if cluster is not None:
            cluster.stop()


def start_cluster(args):
    """A one-node cluster on loopback for the Ray runs to join, as a team's running cluster."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ray_cluster import LocalCluster
    from stages.config import RayConfig

    cluster = LocalCluster()
    idle = RayConfig().idle_workers
    cluster.start_node("head", os.cpu_count(), head=True,
                       env={} if idle is None else {"RAY_num_workers_soft_limit": str(idle)})
    return cluster


def compare(args, tmp: str, run: Callable[[str, str, Path], tuple[TreeSample, int]]) -> None:
    """Both runs at each size, one table row each (and the breakdown)."""
    print(f"{'images':>6} {'plain img/s':>11} {'ray img/s':>9} {'ratio':>6} "
          f"{'ray+init':>8} {'plain GiB':>9} {'ray GiB':>8} {'plain HWM':>9} {'actor HWM':>9} "
          f"{'plain CPU':>9} {'ray CPU':>7}")
    for n in args.sizes:
        folder = Path(tmp) / f"photos-{n}"
        make_folder(folder, n, args.short_side, args.photos)
        ratios = []
        for pair in range(args.repeat):
            ratios.append(compare_pair(args, tmp, run, n, folder, pair))
        if args.repeat > 1:
            ratios.sort()
            print(f"{n:>6} images, {args.repeat} pairs: median ratio {statistics.median(ratios):.2f} "
                  f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)


def compare_pair(args, tmp: str, run, n: int, folder: Path, pair: int) -> float:
    """One plain and one Ray run over `folder` (plain first on even pairs), a table row; the ratio."""
    results = {}
    for mode in ("plain", "ray") if pair % 2 == 0 else ("ray", "plain"):
        store = f"{tmp}/{mode}-{n}-{pair}"
        results[mode] = run(mode, store, folder)
        shutil.rmtree(store, ignore_errors=True)
    (plain_run, plain_pid), (ray_run, ray_pid) = results["plain"], results["ray"]
    plain, ray = plain_run.result, ray_run.result
    plain_mark = max(plain_run.hwm.values(), default=0) / 2**20  # the one process
    ray_marks = hwm_roles(ray_run)
    actor_mark = ray_marks["model actors"]
    plain_cpu, ray_cpu = cpu_roles(plain_run, plain_pid), cpu_roles(ray_run, ray_pid)
    assert plain["masks"] == ray["masks"], (plain, ray)  # the same work, the same output
    p_rate, r_rate = n / plain["seconds"], n / ray["seconds"]
    r_init = n / (ray["seconds"] + ray["setup"])
    print(f"{n:>6} {p_rate:>11.2f} {r_rate:>9.2f} {r_rate / p_rate:>6.2f} "
          f"{r_init / p_rate:>8.2f} {plain_run.peak_gib:>9.2f} {ray_run.peak_gib:>8.2f} "
          f"{plain_mark:>9.2f} {actor_mark:>9.2f} {sum(plain_cpu.values()):>9.1f} "
          f"{sum(ray_cpu.values()):>7.1f}", flush=True)
    if args.breakdown:
        print(f"       plain peak: {breakdown(plain_run.peak_parts)}\n       ray peak: "
              f"{breakdown(ray_run.peak_parts)}", flush=True)
        print(f"       every process's high-water mark summed: plain {plain_run.hwm_sum_gib:.2f}, "
              f"ray {ray_run.hwm_sum_gib:.2f} GiB", flush=True)
        print("       peak GiB by kind of page: " + "; ".join(
            f"{mode} " + ", ".join(f"{kind} {kib / 2**20:.2f}" for kind, kib in sample.peak_kinds.items())
            for mode, sample in (("plain", plain_run), ("ray", ray_run))
        ), flush=True)
        print("       ray CPU s: " + ", ".join(
            f"{name} {seconds:.1f}" for name, seconds in ray_cpu.items()
        ), flush=True)
        print("       ray HWM GiB (largest process): " + ", ".join(
            f"{name} {gib:.2f}" for name, gib in ray_marks.items()
        ), flush=True)

    return r_rate / p_rate

if __name__ == "__main__":
    main()
