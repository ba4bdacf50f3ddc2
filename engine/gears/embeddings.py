"""Image embeddings kept in the store: encode each image once, answer every click from it.

The encoder is the expensive half of SAM (seconds per image on a CPU), the decoder the cheap one
(tens of ms). Gears 1 and 2 and the web tool therefore encode each image once into
`STORE/embeddings/<encoder-fingerprint>/<shard>.parquet` (see `sharding.store`) and then set the
predictor from the stored state. The fingerprint ties an embedding to its encoder's weights:
after a retrain that changes the encoder, the old embeddings are simply not found.

Two ways in, one writer (`add_embeddings`): `embed_shard` encodes a whole shard in this process
(the detector training of gear 2); in the Ray pipelines each model actor encodes its images
(`embed_image`) and the driver adds them to the shard's file when the shard is committed
(`keep_embedded`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from engine.image_io import ImageLoadError, load_image
from engine.predictor import ImageEmbedding, SamPredictor, encoder_fingerprint
from sharding.store import Store


@dataclass
class EmbedReport:
    shard: str
    encoded: int = 0
    reused: int = 0
    unreadable: int = 0  # left for the annotation pass, which quarantines them with the reason
    seconds: float = 0.0


def embed_shard(
    store: Store,
    shard: str,
    predictor: SamPredictor,
    on_image: Callable[[int], None] | None = None,
) -> EmbedReport:
    """Make sure every readable image of `shard` has an embedding by the predictor's encoder.

    Encodes only the images without one (a rerun after an interruption redoes nothing that was
    committed) and rewrites the shard's embeddings file atomically when anything was added
    (`add_embeddings`).
    """
    t0 = time.perf_counter()
    fingerprint = encoder_fingerprint(predictor.model)
    stored = store.embedding_ids(fingerprint, shard)
    report = EmbedReport(shard)
    wanted = set(store.image_ids(shard))
    if wanted and wanted <= stored:
        report.reused = len(wanted)
        return report

    def encoded() -> Iterator[tuple[int, bytes]]:
        for row in store.iter_shard(shard, batch_size=4):
            if row.image_id in stored:
                report.reused += 1
                continue
            try:
                rgb = load_image(
                    row.data, name=row.source, max_pixels=store.max_pixels, min_side=store.min_side
                )
            except ImageLoadError:
                report.unreadable += 1
                continue
            predictor.set_image(rgb)
            report.encoded += 1
            if on_image is not None:
                on_image(row.image_id)
            yield row.image_id, predictor.get_image_state().to_bytes()

    add_embeddings(store, fingerprint, shard, encoded())
    report.seconds = time.perf_counter() - t0
    return report


def add_embeddings(
    store: Store, fingerprint: str, shard: str, new: Iterable[tuple[int, bytes]]
) -> int:
    """Add embeddings to a shard's file: one atomic rewrite with the stored rows kept and the new
    ones after them (streamed: one embedding in memory at a time). Nothing is written when `new`
    is empty. Returns: how many were added.

    Arguments:
      fingerprint (str): `encoder_fingerprint` of the encoder that made them.
      new: (image_id, `ImageEmbedding.to_bytes()`) pairs; ids already stored are left out.
    """
    stored = store.embedding_ids(fingerprint, shard)
    fresh = (row for row in new if row[0] not in stored)
    first = next(fresh, None)
    if first is None:
        return 0
    added = 0

    def kept() -> Iterator[tuple[int, bytes]]:
        for image_id in sorted(stored):
            data = store.read_embedding(fingerprint, shard, image_id)
            if data is not None:
                yield image_id, data

    def counted() -> Iterator[tuple[int, bytes]]:
        nonlocal added
        for row in chain([first], fresh):
            added += 1
            yield row

    store.write_embeddings(fingerprint, shard, chain(kept(), counted()))
    return added


@dataclass
class EmbeddedImage:
    """How one image got its embedding in a model actor: `data` the new embedding's bytes, or
    None when the stored one was used; `seconds` spent on it."""

    fingerprint: str
    data: bytes | None
    seconds: float = 0.0


def embed_image(
    predictor: SamPredictor, store: Store, shard: str, image_id: int, rgb: np.ndarray
) -> EmbeddedImage:
    """Set the predictor to one store image, from its stored embedding when there is one, else by
    encoding `rgb` (the new embedding is returned, to be kept with `keep_embedded`). A new
    embedding is set from its stored form, so every click is answered exactly as it will be from
    the store later."""
    t0 = time.perf_counter()
    fingerprint = encoder_fingerprint(predictor.model)
    if set_image(predictor, store, shard, image_id, rgb):
        return EmbeddedImage(fingerprint, None, time.perf_counter() - t0)
    data = predictor.get_image_state().to_bytes()
    predictor.set_image_state(ImageEmbedding.from_bytes(data, name=f"embedding of {image_id}"))
    return EmbeddedImage(fingerprint, data, time.perf_counter() - t0)


def keep_embedded(
    store: Store, shard: str, images: Iterable[tuple[int, EmbeddedImage | None]]
) -> EmbedReport:
    """Store the new embeddings of a shard's images (`add_embeddings`, one pass over `images`).

    Arguments:
      images: (image_id, EmbeddedImage) of every image of the shard; None for an image that
        never reached the encoder (unreadable).
    Raises:
      ValueError: the embeddings come from different encoders (model actors with other weights).
    """
    report = EmbedReport(shard)

    def new() -> Iterator[tuple[str, int, bytes]]:
        for image_id, item in images:
            if item is None:
                report.unreadable += 1
                continue
            report.seconds += item.seconds
            if item.data is None:
                report.reused += 1
                continue
            report.encoded += 1
            yield item.fingerprint, image_id, item.data

    rows = new()
    first = next(rows, None)
    if first is not None:

        def same_encoder() -> Iterator[tuple[int, bytes]]:
            for fingerprint, image_id, data in chain([first], rows):
                if fingerprint != first[0]:
                    raise ValueError(
                        f"{shard}: image {image_id} was encoded by encoder {fingerprint}, "
                        f"others by {first[0]}: the model actors loaded different weights (is the checkpoint "
                        "the same file on every node?)"
                    )
                yield image_id, data

        add_embeddings(store, first[0], shard, same_encoder())
    return report


def unembedded_shards(store: Store, fingerprint: str) -> list[str]:
    """Shards with an image that has no embedding by this encoder (an unreadable image has none,
    so its shard is always listed)."""
    return [
        shard
        for shard, ids in store.shard_images().items()
        if not set(ids) <= store.embedding_ids(fingerprint, shard)
    ]


def load_predictor(cfg: Any) -> SamPredictor:
    """The predictor of a `model:` block (`engine.model.ModelConfig`; bf16: autocast)."""
    import torch

    from engine.model import load_model

    return SamPredictor(load_model(cfg), autocast_dtype=torch.bfloat16 if cfg.bf16 else None)


def set_image(
    predictor: SamPredictor, store: Store, shard: str, image_id: int, rgb: np.ndarray | None
) -> bool:
    """Set the predictor to one store image: from its stored embedding when there is one (returns
    True), else by encoding `rgb` (returns False; `rgb` must then be given)."""
    data = store.read_embedding(encoder_fingerprint(predictor.model), shard, image_id)
    if data is not None:
        state = ImageEmbedding.from_bytes(data, name=f"embedding of image {image_id}")
        if rgb is None or tuple(state.original_size) == tuple(rgb.shape[:2]):
            predictor.set_image_state(state)
            return True
    if rgb is None:
        raise ValueError(f"image {image_id} has no stored embedding and no pixels were given")
    predictor.set_image(rgb)
    return False
