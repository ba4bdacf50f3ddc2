"""Gears 1 and 2 of the data engine: model-assisted and semi-automatic annotation.

- `embeddings`: encode a shard's images once and keep the embeddings in the store, so that each
  click costs only the mask decoder.
- `assisted`: gear 1, annotators (simulated, driven by COCO reference masks) click objects in
  order of prominence; every accepted mask keeps its effort (clicks, IoU, seconds).
- `server`: the same gear for people, a web page served from the store (`sa-engine serve`).
- `detector` and `semi`: gear 2, an object box detector on the SAM embedding prefills images,
  annotators add only what is missing.
- `effort`: the per-gear, per-round effort report (table and plot).
"""

ASSISTED_STAGE = "assisted"
SEMI_STAGE = "semi"
