"""The one image loader: every odd input is normalised to RGB uint8 or refused with a named reason."""

import io

import numpy as np
import pytest
from PIL import Image

from engine.image_io import ImageLoadError, load_image, load_image_with_info


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgb_jpeg_round_trip(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (200, 10, 10)
    path = tmp_path / "a.jpg"
    path.write_bytes(_encode(Image.fromarray(rgb), "JPEG", quality=95))
    out = load_image(path)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert abs(int(out[5, 5, 0]) - 200) < 8


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(mode):
    image = Image.new("RGB", (48, 32), (120, 60, 30)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((32, 48), 40000, np.uint16))
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out, info = load_image_with_info(_encode(image, fmt))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert info.original_mode.startswith(mode[:1])
    if mode == "I;16":
        assert int(out[0, 0, 0]) == 40000 * 255 // 65535


def test_exif_orientation_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out, info = load_image_with_info(_encode(image, "JPEG", exif=exif.tobytes()))
    assert info.exif_rotated and out.shape[:2] == (60, 20)


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty"), (b"hello, not a picture", "not_an_image")],
)
def test_bad_bytes_are_named(data, reason):
    with pytest.raises(ImageLoadError) as err:
        load_image(data, name="photo.jpg")
    assert err.value.reason == reason and "photo.jpg" in str(err.value)


def test_truncated_jpeg_is_corrupt():
    data = _encode(Image.new("RGB", (200, 200), (9, 9, 9)), "JPEG")
    with pytest.raises(ImageLoadError) as err:
        load_image(data[: len(data) // 2], name="cut.jpg")
    assert err.value.reason == "corrupt"


def test_bomb_and_tiny_guards():
    data = _encode(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(ImageLoadError) as err:
        load_image(data, max_pixels=10_000)
    assert err.value.reason == "too_large"
    with pytest.raises(ImageLoadError) as err:
        load_image(_encode(Image.new("RGB", (20, 50)), "PNG"), min_side=32)
    assert err.value.reason == "too_small"


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError) as err:
        load_image(tmp_path / "nope.jpg")
    assert err.value.reason == "missing"
