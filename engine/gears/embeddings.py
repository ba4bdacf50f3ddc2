"""Image embeddings kept in the store: encode each image once, answer every click from it.

The encoder is the expensive half of SAM (seconds per image on a CPU), the decoder the cheap one
(tens of ms). Gears 1 and 2 and the web tool therefore encode a shard's images once, up front,
into `STORE/embeddings/<encoder-fingerprint>/<shard>.parquet` (see `sharding.store`) and then set
the predictor from the stored state. The fingerprint ties an embedding to its encoder's weights:
after a retrain that changes the encoder, the old embeddings are simply not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

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
    committed) and rewrites the shard's embeddings file atomically when anything was added.
    """
    import time

    t0 = time.perf_counter()
    fingerprint = encoder_fingerprint(predictor.model)
    stored = store.embedding_ids(fingerprint, shard)
    report = EmbedReport(shard)
    wanted = set(store.shard_images().get(shard, []))
    if wanted and wanted <= stored:
        report.reused = len(wanted)
        return report

    def rows() -> Iterator[tuple[int, bytes]]:
        for row in store.iter_shard(shard, batch_size=4):
            if row.image_id in stored:
                data = store.read_embedding(fingerprint, shard, row.image_id)
                if data is not None:
                    report.reused += 1
                    yield row.image_id, data
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

    store.write_embeddings(fingerprint, shard, rows())
    report.seconds = time.perf_counter() - t0
    return report


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
