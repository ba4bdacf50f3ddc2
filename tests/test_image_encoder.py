"""The encoder's inference path (logits in place, in a kept buffer) against its autograd path."""

import threading

import torch

from engine.model import SamConfig, build_sam
from engine.modeling import image_encoder


def _tiny_encoder() -> torch.nn.Module:
    config = SamConfig(
        image_size=256,
        image_embedding_size=(16, 16),
        window_size=5,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        mask_in_chans=8,
        decoder_transformer_depth=1,
        decoder_transformer_mlp_dim=32,
        decoder_transformer_num_heads=4,
        iou_head_hidden_dim=32,
    )
    encoder = build_sam(config).image_encoder
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            scale = 0.5 if "rel_pos" in name else 0.05  # relative positions that matter
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return encoder.eval()


def test_inference_path_gives_the_autograd_paths_bits_and_reuses_its_buffer():
    encoder = _tiny_encoder()
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    reference = encoder(image).detach()  # grad enabled: Meta's out-of-place expression
    image_encoder.free_logits_buffers()
    with torch.no_grad():
        first = encoder(image)
        kept = {key: t.data_ptr() for key, t in image_encoder._BUFFERS.by_key.items()}
        second = encoder(image)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert len(kept) == 2  # windowed and global blocks: one buffer per shape
    assert {k: t.data_ptr() for k, t in image_encoder._BUFFERS.by_key.items()} == kept
    image_encoder.free_logits_buffers()
    assert image_encoder._BUFFERS.by_key == {}


def test_threads_encoding_at_once_each_get_their_own_buffer():
    encoder = _tiny_encoder()
    images = [torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    expected = [encoder(image).detach() for image in images]
    results: dict[int, bool] = {}

    def encode(i: int) -> None:
        with torch.no_grad():
            results[i] = all(torch.equal(encoder(images[i]), expected[i]) for _ in range(5))

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: True, 1: True, 2: True, 3: True}
