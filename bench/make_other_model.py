"""A second test model for the generator's parity and speed against Meta's: other encoder dims.

    python bench/make_other_model.py /tmp/other --embed-dim 96 --depth 3 --heads 3 --global 2 --window 8
    python bench/make_other_model.py /tmp/other512 --image-size 512   # a 32x32 image embedding
    python bench/make_other_model.py /tmp/mm2 --multimask-outputs 2     # two masks a prompt
    python bench/bench_amg.py --only A --meta-path /tmp/meta_sam --model /tmp/other/config.json \
        /tmp/other/model.pth --image demo/photos/chelsea.jpg --set pred_iou_thresh=0.86

The parity fixture's model has one encoder size. This writes a config.json with another encoder
(width, depth, heads, global-attention blocks, window) and a state dict whose encoder is randomly
initialised and perturbed the way the fixture's was (std 0.02; rel-pos tables 0.2, pos_embed 0.1),
while the prompt encoder and mask decoder are the fixture's crafted ones (a random decoder gives
image-filling masks, and the generator collapses to one). Both generators load it unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SA_ENGINE_SHARED", ROOT.parent / "shared"))
PARITY = SHARED / "fixtures" / "sam_parity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for config.json and model.pth")
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--global", dest="global_blocks", type=int, nargs="*", default=[2])
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=1024,
                        help="the model's input side (its image embedding is this / 16 a side)")
    parser.add_argument("--multimask-outputs", type=int, default=3, choices=[1, 2, 3],
                        help="masks a prompt gives (the fixture's decoder's first ones are kept)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not PARITY.is_dir():
        sys.exit(f"{PARITY} is absent: the fixture's decoder is needed")
    import torch

    from engine.model import build_sam

    config = json.loads((PARITY / "config.json").read_text())
    config.update(
        encoder_embed_dim=args.embed_dim,
        encoder_depth=args.depth,
        encoder_num_heads=args.heads,
        encoder_global_attn_indexes=args.global_blocks,
        window_size=args.window,
        image_size=args.image_size,
        image_embedding_size=[args.image_size // config["patch_size"]] * 2,
        num_multimask_outputs=args.multimask_outputs,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    sam = build_sam(config_path)
    generator = torch.Generator().manual_seed(args.seed)
    state = {}
    for name, value in sam.image_encoder.state_dict().items():
        std = 0.2 if "rel_pos" in name else 0.1 if name == "pos_embed" else 0.02
        state[f"image_encoder.{name}"] = value + std * torch.randn(value.shape, generator=generator)
    fixture = torch.load(PARITY / "sam_small.pth", map_location="cpu", weights_only=True)
    state.update({k: v for k, v in fixture.items() if not k.startswith("image_encoder.")})
    tokens = 1 + args.multimask_outputs  # the single-mask output, then the multimask ones
    state["mask_decoder.mask_tokens.weight"] = state["mask_decoder.mask_tokens.weight"][:tokens]
    last = f"mask_decoder.iou_prediction_head.layers.{config['iou_head_depth'] - 1}."
    for name in [n for n in state if n.startswith(last)]:
        state[name] = state[name][:tokens]
    for name in [n for n in state if n.startswith("mask_decoder.output_hypernetworks_mlps.")]:
        if int(name.split(".")[2]) >= tokens:
            del state[name]
    sam.load_state_dict(state)  # the engine takes it: so does Meta's Sam (same names)
    torch.save(state, args.out / "model.pth")
    print(f"wrote {config_path} and {args.out / 'model.pth'} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
