"""Automatic mask generator: seconds per image, peak memory, and agreement with Meta's generator.

    python bench/bench_amg.py                       # sets A and B of the parity fixture + sa1b config
    python bench/bench_amg.py --meta-path /tmp/meta_sam   # also Meta's segment-anything 1.0, side by side
    python bench/bench_amg.py --only B --grid 8 16 32     # peak memory as points_per_side grows
    python bench/bench_amg.py --fast                      # also the approximate mode (fast_decoder)
    python bench/bench_amg.py --no-prefilter              # also the exact mode without iou_prefilter
    python bench/bench_amg.py --device cuda               # on a GPU (both sides; warm timing)
    python bench/bench_amg.py --only B --meta-path /tmp/meta_sam \
        --set pred_iou_thresh=0.88 --set stability_score_thresh=0.95   # thresholds that filter
    python bench/bench_amg.py --only A --meta-path /tmp/meta_sam --image demo/photos/chelsea.jpg \
        --model other_config.json other.pth --set points_per_batch=32   # another model and photo

Each run is a fresh subprocess, so its peak RSS is its own. Agreement with the fixture: same count,
same order, per-mask IoU, max |predicted_iou| / |stability| differences, identical bbox / crop_box.
With `--set key=value` (parameters other than the fixture's), `--image` or `--model` the engine
is compared with Meta's output of the same run instead, so --meta-path is then needed for an
agreement figure. `--model CONFIG CHECKPOINT` takes any config.json-style architecture (as the
fixture's) and a plain state dict, for both generators.
Meta's generator (only when `segment_anything` is importable from --meta-path; never a dependency)
runs through `bench/meta_standin.py` (pure-torch stand-ins for its four torchvision symbols).
On CUDA each generator runs twice on the image and the second run is timed (the first pays for
CUDA's context and kernel loading; it is printed as `first_seconds`), TF32 is off unless --tf32
(cuDNN's convolutions use it by default, ~1e-3 off float32: enough to reorder candidates), and
the engine is also compared with Meta's output of the same run on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))
PARITY = SHARED / "fixtures" / "sam_parity"


def _params(which: str) -> dict:
    if which == "A":
        return json.loads((PARITY / "amg_coco_rle.json").read_text())["params"]
    if which == "B":
        return json.loads((PARITY / "amg_binary_mask_meta.json").read_text())["params"]
    sys.path.insert(0, str(ROOT))
    from engine.cli.config import load_config

    amg = dict(load_config("sa1b")["amg"])
    amg.pop("decoder_batch", None)
    return amg


def _reference(which: str, shape):
    import numpy as np

    from engine import rle

    if which == "A":
        anns = json.loads((PARITY / "amg_coco_rle.json").read_text())["annotations"]
        masks = [rle.decode(a["segmentation"]) for a in anns]
        return anns, masks
    ref = np.load(PARITY / "amg_binary_mask.npz")
    h, w = shape
    masks = np.unpackbits(ref["masks_packed"], axis=1, count=h * w).reshape(-1, h, w).astype(bool)
    anns = [
        {
            "bbox": ref["bbox_xywh"][i].tolist(),
            "crop_box": ref["crop_box_xywh"][i].tolist(),
            "predicted_iou": float(ref["predicted_iou"][i]),
            "stability_score": float(ref["stability_score"][i]),
        }
        for i in range(len(masks))
    ]
    return anns, masks


def agreement(out: list[dict], anns: list[dict], masks) -> dict:
    import numpy as np

    from engine import rle

    n = min(len(out), len(anns))
    ious = []
    for i in range(n):
        mine = out[i]["segmentation"]
        mine = rle.decode(mine) if isinstance(mine, dict) else mine
        union = (mine | masks[i]).sum()
        ious.append(float((mine & masks[i]).sum() / union) if union else 1.0)
    return {
        "count": len(out),
        "reference_count": len(anns),
        "same_bbox_and_crop": sum(
            list(out[i]["bbox"]) == list(anns[i]["bbox"])
            and list(out[i]["crop_box"]) == list(anns[i]["crop_box"])
            for i in range(n)
        ),
        "min_mask_iou": min(ious) if ious else None,
        "max_iou_pred_diff": max(
            (abs(out[i]["predicted_iou"] - anns[i]["predicted_iou"]) for i in range(n)), default=0
        ),
        "max_stability_diff": float(
            np.nanmax([abs(out[i]["stability_score"] - anns[i]["stability_score"]) for i in range(n)])
        )
        if n
        else 0,
    }


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def one(
    which: str,
    impl: str,
    grid: int | None,
    meta_path: str | None,
    overrides: dict | None = None,
    dump: str | None = None,
    device: str = "cpu",
    tf32: bool = False,
    image_path: str | None = None,
    model: tuple[str, str] | None = None,
) -> dict:
    """Run one generator in this process and report (called in a subprocess); `dump`: a file to
    pickle the records to (masks as COCO RLE), for the agreement with another run."""
    sys.path.insert(0, str(ROOT))
    import torch

    from engine.image_io import load_image

    torch.set_num_threads(torch.get_num_threads())
    if device != "cpu" and not tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    image = load_image(image_path or PARITY / "image.png")
    config, checkpoint = model or (PARITY / "config.json", PARITY / "sam_small.pth")
    params = _params(which)
    if grid is not None:
        params["points_per_side"] = grid
    params.update(overrides or {})
    if impl == "meta":
        sys.path.insert(0, meta_path)
        from bench.meta_standin import build_meta_sam

        sam = build_meta_sam(config, checkpoint).to(device)
        from segment_anything import SamAutomaticMaskGenerator as Generator
    else:
        from engine.amg import SamAutomaticMaskGenerator as Generator
        from engine.model import build_sam

        sam = build_sam(config, checkpoint=checkpoint, device=device)
    if impl == "engine-fast":
        params["fast_decoder"] = True  # the approximate mode
    if impl == "engine-noprefilter":
        params["iou_prefilter"] = False  # every prompt through Meta's arithmetic
    generator = Generator(sam, **params)
    first = None
    if device != "cpu":
        start = time.perf_counter()
        generator.generate(image)
        first = round(time.perf_counter() - start, 2)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = generator.generate(image)
    seconds = time.perf_counter() - start
    report = {
        "set": which,
        "impl": impl,
        "device": device,
        "points_per_side": params["points_per_side"],
        "seconds": round(seconds, 2),
        "masks": len(out),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 2),  # steadier than wall when shared
    }
    if first is not None:
        report["first_seconds"] = first
        report["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if which in ("A", "B") and grid is None and not overrides and not image_path and not model:
        anns, masks = _reference(which, image.shape[:2])
        report["vs_fixture"] = agreement(out, anns, masks)
    if dump:
        import pickle

        from engine import rle

        for record in out:
            if not isinstance(record["segmentation"], dict):
                record["segmentation"] = rle.encode(record["segmentation"])[0]
        Path(dump).write_bytes(pickle.dumps(out))
    return report


def agreement_with(dump: str, reference_dump: str) -> dict:
    """`agreement` between two runs' pickled records (the second is the reference)."""
    import pickle

    from engine import rle

    out = pickle.loads(Path(dump).read_bytes())
    anns = pickle.loads(Path(reference_dump).read_bytes())
    return agreement(out, anns, [rle.decode(a["segmentation"]) for a in anns])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["B", "A", "sa1b"], choices=["A", "B", "sa1b"])
    parser.add_argument("--meta-path", help="folder holding segment_anything (pip --target)")
    parser.add_argument("--grid", nargs="*", type=int, help="points_per_side values (memory curve)")
    parser.add_argument("--fast", action="store_true", help="also the approximate mode (amg.fast_decoder)")
    parser.add_argument("--no-prefilter", action="store_true",
                        help="also the exact mode with amg.iou_prefilter off")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a generator parameter in every run (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the model of both generators)")
    parser.add_argument("--tf32", action="store_true", help="CUDA: leave TF32 on (PyTorch's default)")
    parser.add_argument("--image", help="another photo than the fixture's (compared with Meta's run)")
    parser.add_argument("--model", nargs=2, metavar=("CONFIG", "CHECKPOINT"),
                        help="another model than the fixture's: config.json and state dict")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set {item!r}: expected KEY=VALUE, e.g. --set pred_iou_thresh=0.88")
        overrides[key] = _value(value)
    if args.one:
        which, impl, grid, meta = args.one
        grid = None if grid == "-" else int(grid)
        report = one(which, impl, grid, meta, overrides, args.dump, args.device, args.tf32,
                     args.image, args.model)
        print(json.dumps(report))
        return
    if not PARITY.is_dir():
        sys.exit(f"{PARITY} is absent: the parity fixture is needed")
    meta_ok = False
    if args.meta_path:
        meta_ok = (Path(args.meta_path) / "segment_anything").is_dir()
        if not meta_ok:
            print(f"segment_anything not found under {args.meta_path}: Meta's side skipped")
    tmp = tempfile.mkdtemp(prefix="bench_amg")
    compare_runs = bool(overrides or args.device != "cpu" or args.image or args.model)
    for which in args.only:
        for grid in args.grid or [None]:
            impls = ["engine"] + (["engine-fast"] if args.fast else [])
            impls += ["engine-noprefilter"] if args.no_prefilter else []
            impls += ["meta"] if meta_ok and which in ("A", "B") else []
            results = {}
            dumps = {impl: f"{tmp}/{which}-{grid}-{impl}.pkl" for impl in impls}
            for impl in impls:
                cmd = [sys.executable, __file__, "--one", which, impl, str(grid or "-"), str(args.meta_path)]
                cmd += [f"--set={item}" for item in args.set] + [f"--device={args.device}"]
                cmd += ["--tf32"] if args.tf32 else []
                cmd += [f"--image={Path(args.image).resolve()}"] if args.image else []
                cmd += ["--model", *(str(Path(path).resolve()) for path in args.model)] if args.model else []
                if compare_runs:
                    cmd += ["--dump", dumps[impl]]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    print(f"{which}/{impl} failed:\n{done.stderr[-2000:]}")
                    continue
                results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(results[impl]), flush=True)
            for impl in ("engine", "engine-fast", "engine-noprefilter"):
                if "meta" in results and impl in results:
                    ratio = results["meta"]["seconds"] / results[impl]["seconds"]
                    print(f"set {which}: Meta {results['meta']['seconds']} s / {impl} "
                          f"{results[impl]['seconds']} s = {ratio:.2f}x", flush=True)
                    if compare_runs:
                        vs_meta = agreement_with(dumps[impl], dumps["meta"])
                        print(f"set {which}: {impl} vs Meta {json.dumps(vs_meta)}", flush=True)


if __name__ == "__main__":
    main()
