"""A second test model for the generator's parity and speed against Meta's: other model dims.

    python bench/make_other_model.py /tmp/other --embed-dim 96 --depth 3 --heads 3 --global 2 --window 8
    python bench/make_other_model.py /tmp/other512 --image-size 512   # a 32x32 image embedding
    python bench/make_other_model.py /tmp/mm2 --multimask-outputs 2     # two masks a prompt
    python bench/make_other_model.py /tmp/dec128 --decoder-width 128 --decoder-heads 4 \
        --decoder-depth 3                                                 # another decoder
    python bench/bench_amg.py --only A --meta-path /tmp/meta_sam --model /tmp/other/config.json \
        /tmp/other/model.pth --image demo/photos/chelsea.jpg --set pred_iou_thresh=0.86

The parity fixture's model has one encoder size. This writes a config.json with another encoder
(width, depth, heads, global-attention blocks, window) and a state dict whose encoder is randomly
initialised and perturbed the way the fixture's was (std 0.02; rel-pos tables 0.2, pos_embed 0.1),
while the prompt encoder and mask decoder are the fixture's crafted ones (a random decoder gives
image-filling masks, and the generator collapses to one). Both generators load it unchanged.

With `--decoder-width/--decoder-heads/--decoder-depth` other than SAM's (256, 8, 2) there is no
crafted decoder of that shape: the prompt encoder and mask decoder are random (weights std 0.08,
biases 0.1, norm gains 0.5-1.5; the hypernetworks' last layers scaled so mask logits spread over
several units and the stability filter bites). Its masks are large and alike across prompts, so
NMS keeps one or two: a check of the generators' arithmetic on other decoder shapes (predicted
IoUs around -0.2..0.3 on a COCO photo: give thresholds in that range), not of how many masks
they find.
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
    parser.add_argument("--decoder-width", type=int, default=256, help="prompt_embed_dim")
    parser.add_argument("--decoder-heads", type=int, default=8)
    parser.add_argument("--decoder-depth", type=int, default=2, help="two-way blocks")
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
    crafted = (args.decoder_width, args.decoder_heads, args.decoder_depth) == (256, 8, 2)
    if not crafted:
        config.update(
            prompt_embed_dim=args.decoder_width,
            decoder_transformer_num_heads=args.decoder_heads,
            decoder_transformer_depth=args.decoder_depth,
            decoder_transformer_mlp_dim=4 * args.decoder_width,
            iou_head_hidden_dim=args.decoder_width,
            mask_in_chans=max(4, args.decoder_width // 16),
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
    if crafted:
        fixture = torch.load(PARITY / "sam_small.pth", map_location="cpu", weights_only=True)
        state.update({k: v for k, v in fixture.items() if not k.startswith("image_encoder.")})
    else:
        state.update(random_prompt_side(sam, generator))
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


def random_prompt_side(sam, generator) -> dict:
    """The prompt encoder's and mask decoder's tensors, random (see the module)."""
    import torch

    state = {}
    for part in ("prompt_encoder", "mask_decoder"):
        for name, value in getattr(sam, part).state_dict().items():
            if "pe_layer" in name:  # the random Fourier features: as built
                state[f"{part}.{name}"] = value
            elif "norm" in name and name.endswith("weight"):
                state[f"{part}.{name}"] = 0.5 + torch.rand(value.shape, generator=generator)
            else:
                std = 0.1 if value.ndim == 1 else 0.08
                if name.startswith("output_hypernetworks_mlps.") and ".layers.2." in name:
                    std *= 100.0  # mask logits of several units, not ~0.06
                state[f"{part}.{name}"] = std * torch.randn(value.shape, generator=generator)
    return state


if __name__ == "__main__":
    main()
