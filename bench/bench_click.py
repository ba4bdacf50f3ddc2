"""Click latency of gears 1 and 2: decoder-only ms per click from a stored image embedding.

A click in the annotation tool (or of the simulated annotator) never runs the image encoder: the
image's embedding is read back from the store (`ImageEmbedding.from_bytes`) and each click is one
prompt-encoder + mask-decoder pass with all clicks so far and the previous low-res logits, plus
the upscale to the photo's size. Target: <= 50 ms per click on CPU for a vit_b-sized decoder
(every SAM variant has the same decoder; only the encoder differs, and it is not run here).

    python bench/bench_click.py [--clicks 10] [--repeats 5] [--size 1500x1000] [--threads N] [--bf16]

vit_b is built with random weights (latency does not depend on them); the parity fixture model
(../shared/fixtures/sam_parity) is measured too when present. Prints median and p90 wall ms per
click and the median process CPU ms (with --threads 1 that is the click's single-core cost even on
a busy machine, where wall time also counts waiting for a core), for the decoder alone and for a
full web-tool click (decoder + the mask PNG sent to the page). Also prints the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.model import build_sam  # noqa: E402
from engine.predictor import ImageEmbedding, SamPredictor, encoder_fingerprint  # noqa: E402


def click_session(predictor: SamPredictor, clicks: int, rng: np.random.Generator, png: bool):
    """One simulated session of `clicks` clicks; returns (wall ms, process CPU ms) per click."""
    from engine.gears.server import mask_png

    h, w = predictor.original_size
    coords, labels, logits, out = [], [], None, []
    for i in range(clicks):
        coords.append([float(rng.uniform(0, w - 1)), float(rng.uniform(0, h - 1))])
        labels.append(1 if i == 0 or rng.random() < 0.6 else 0)
        t0, c0 = time.perf_counter(), time.process_time()
        masks, scores, low_res = predictor.predict(
            np.array(coords), np.array(labels), mask_input=logits, multimask_output=i == 0
        )
        best = int(np.argmax(scores))
        logits = low_res[best][None]
        if png:
            mask_png(masks[best])
        out.append(((time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000))
    return out


def measure(name: str, sam, size: tuple[int, int], clicks: int, repeats: int, bf16: bool) -> None:
    predictor = SamPredictor(sam, autocast_dtype=torch.bfloat16 if bf16 else None)
    name += " bf16" if bf16 else ""
    h, w = size
    scale = sam.img_size / max(h, w)
    state = ImageEmbedding(
        torch.randn(1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size),
        (int(h * scale + 0.5), int(w * scale + 0.5)),
        (h, w),
        encoder_fingerprint(sam),
    )
    data = state.to_bytes()
    t0 = time.perf_counter()
    predictor.set_image_state(ImageEmbedding.from_bytes(data))
    load_ms = (time.perf_counter() - t0) * 1000
    rng = np.random.default_rng(0)
    click_session(predictor, 3, rng, png=True)  # warm-up
    for png in (False, True):
        pairs = []
        for _ in range(repeats):
            pairs += click_session(predictor, clicks, rng, png)
        times = sorted(p[0] for p in pairs)
        cpu = statistics.median(p[1] for p in pairs)
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        what = "decoder + mask PNG (web click)" if png else "decoder only"
        print(
            f"{name:>16} | {w}x{h} | {what:<30} | wall median {statistics.median(times):6.1f} ms"
            f" | p90 {p90:6.1f} ms | CPU median {cpu:6.1f} ms | {len(times)} clicks"
        )
    print(f"{name:>16} | embedding ({len(data) / 2**20:.1f} MiB .npz) set in {load_ms:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="1500x1000", help="photo WxH the masks are upscaled to")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--bf16", action="store_true", help="also under bfloat16 autocast (model.bf16)")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, load average "
        + " ".join(f"{v:.1f}" for v in os.getloadavg())
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for bf16 in (False, True) if args.bf16 else (False,):
            measure("vit_b (random)", build_sam("vit_b"), (h, w), args.clicks, args.repeats, bf16)
        parity = ROOT.parent / "shared" / "fixtures" / "sam_parity"
        if (parity / "config.json").is_file():
            sam = build_sam(parity / "config.json", checkpoint=parity / "sam_small.pth")
            measure("parity fixture", sam, (h, w), args.clicks, args.repeats, False)
        else:
            print(f"parity fixture absent ({parity}): skipped")


if __name__ == "__main__":
    main()
