"""Model benchmark: encoder ms per image, decoder ms per prompt (single and batched), peak memory.

Runs the parity fixture model (when ../shared is present) and vit_b with random weights (the
official architecture; weights do not change the cost). Prints one line per figure.

  python bench/bench_model.py [--device cpu|cuda] [--threads N] [--batch 64] [--vit-b-runs 2] [--bf16]
  python bench/bench_model.py --device cuda --bf16 --vit-b-runs 10 --also vit_l vit_h   # a GPU
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.image_io import load_image  # noqa: E402
from engine.model import build_sam  # noqa: E402
from engine.predictor import SamPredictor  # noqa: E402

SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))
PARITY = SHARED / "fixtures" / "sam_parity"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, runs: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def report(name: str, what: str, values: list[float], per: int = 1) -> None:
    values = [v / per for v in values]
    shown = ", ".join(f"{v:.1f}" for v in values)
    print(
        f"{name:<14} {what:<56} median {statistics.median(values):9.1f} ms  (runs: {shown})",
        flush=True,
    )


def bench_model(
    name: str,
    model_ref: str,
    checkpoint: str | None,
    image: np.ndarray,
    device: torch.device,
    encoder_runs: int,
    decoder_runs: int,
    batch: int,
    bf16: bool,
) -> None:
    start = time.perf_counter()
    sam = build_sam(model_ref, checkpoint=checkpoint, device=device)
    print(
        f"{name:<14} build{' + load' if checkpoint else ''}: {(time.perf_counter() - start) * 1000:.0f} ms; "
        f"{sum(p.numel() for p in sam.parameters()) / 1e6:.1f} M parameters",
        flush=True,
    )
    predictor = SamPredictor(sam)
    report(
        name,
        f"encoder (set_image {image.shape[1]}x{image.shape[0]})",
        timed(lambda: predictor.set_image(image), encoder_runs, device),
    )
    height, width = image.shape[:2]
    point, label = np.array([[width * 0.45, height * 0.4]]), np.array([1])
    predictor.predict(point, label)  # warm-up
    report(
        name,
        "decoder, 1 prompt (predict, 3 masks)",
        timed(lambda: predictor.predict(point, label), decoder_runs, device),
    )
    report(
        name,
        "decoder, 1 prompt (predict, 1 mask)",
        timed(
            lambda: predictor.predict(point, label, multimask_output=False), decoder_runs, device
        ),
    )

    rng = np.random.default_rng(0)
    grid = rng.uniform([0, 0], [width, height], size=(batch, 2))
    coords = torch.as_tensor(
        predictor.transform.apply_coords(grid, predictor.original_size), device=device
    )[:, None, :]
    labels = torch.ones(batch, 1, dtype=torch.int, device=device)
    predictor.predict_torch(coords[:2], labels[:2])  # warm-up
    report(
        name,
        f"decoder, batch of {batch} (predict_torch, 3 masks, logits)",
        timed(
            lambda: predictor.predict_torch(coords, labels, return_logits=True),
            max(1, decoder_runs // 5),
            device,
        ),
        per=batch,
    )
    sparse, dense = sam.prompt_encoder((coords, labels), None, None)
    dense_pe = sam.prompt_encoder.get_dense_pe()
    report(
        name,
        f"mask decoder network only, batch of {batch}",
        timed(
            lambda: sam.mask_decoder(predictor.features, dense_pe, sparse, dense, True),
            max(1, decoder_runs // 5),
            device,
        ),
        per=batch,
    )
    if bf16:
        fast = SamPredictor(sam, autocast_dtype=torch.bfloat16)
        report(
            name,
            "encoder bf16 autocast",
            timed(lambda: fast.set_image(image), encoder_runs, device),
        )
        report(
            name,
            "decoder bf16, 1 prompt (3 masks)",
            timed(lambda: fast.predict(point, label), decoder_runs, device),
        )
    print(f"{name:<14} peak RSS so far {peak_rss_mib():.0f} MiB", flush=True)
    if device.type == "cuda":
        print(
            f"{name:<14} torch.cuda.max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB",
            flush=True,
        )
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--vit-b-runs", type=int, default=2, help="vit_b encoder runs (~10 s each on 2 CPU cores)"
    )
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument("--also", nargs="*", default=[], metavar="MODEL",
                        help="more registry models (random weights), e.g. vit_l vit_h")
    parser.add_argument("--bf16", action="store_true", help="also time bfloat16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
        flush=True,
    )
    with torch.inference_mode():
        if PARITY.is_dir():
            image = load_image(PARITY / "image.png")
            bench_model(
                "fixture",
                str(PARITY / "config.json"),
                str(PARITY / "sam_small.pth"),
                image,
                device,
                encoder_runs=3,
                decoder_runs=10,
                batch=args.batch,
                bf16=args.bf16,
            )
        else:
            print(f"fixture        skipped: {PARITY} is absent")
        image = load_image(ROOT / "demo" / "photos" / "astronaut.jpg")
        for model in ([] if args.skip_vit_b else ["vit_b"]) + args.also:
            bench_model(
                f"{model} random",
                model,
                None,
                image,
                device,
                encoder_runs=args.vit_b_runs,
                decoder_runs=5,
                batch=args.batch,
                bf16=args.bf16,
            )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
