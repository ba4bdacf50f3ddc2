import numpy as np
import torch

from engine.transforms import ResizeLongestSide


def test_preprocess_shape_rounds_half_up_and_keeps_the_long_side():
    assert ResizeLongestSide.get_preprocess_shape(673, 1201, 1024) == (574, 1024)
    assert ResizeLongestSide.get_preprocess_shape(1500, 1000, 1024) == (1024, 683)
    assert ResizeLongestSide.get_preprocess_shape(300, 451, 1024) == (681, 1024)


def test_image_points_and_boxes_follow_the_same_scale(demo_photos):
    from engine.image_io import load_image

    transform = ResizeLongestSide(1024)
    image = load_image(demo_photos[0])
    resized = transform.apply_image(image)
    assert resized.dtype == np.uint8 and max(resized.shape[:2]) == 1024 and resized.flags.writeable
    size = image.shape[:2]
    sy, sx = resized.shape[0] / size[0], resized.shape[1] / size[1]
    points = np.array([[10.0, 20.0], [300.5, 100.25]])
    np.testing.assert_allclose(transform.apply_coords(points, size), points * [sx, sy])
    assert transform.apply_coords(points.astype(np.float32), size).dtype == np.float64
    boxes = np.array([[10.0, 20.0, 300.0, 400.0]])
    np.testing.assert_allclose(transform.apply_boxes(boxes, size), boxes * [sx, sy, sx, sy])

    coords_t = transform.apply_coords_torch(torch.as_tensor(points), size)
    assert coords_t.dtype == torch.float32
    np.testing.assert_allclose(coords_t.numpy(), transform.apply_coords(points, size), rtol=1e-6)
    boxes_t = transform.apply_boxes_torch(torch.as_tensor(boxes), size)
    np.testing.assert_allclose(boxes_t.numpy(), transform.apply_boxes(boxes, size), rtol=1e-6)
    batch = torch.as_tensor(image.copy()).permute(2, 0, 1)[None]
    assert torch.equal(
        transform.apply_image_torch(batch)[0].permute(1, 2, 0), torch.as_tensor(resized)
    )
