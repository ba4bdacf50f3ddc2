"""Release frame: shortest side resized to 1500 px (SA-1B), masks and boxes following the image.

Images smaller than the target are not upscaled (upscaling adds no detail and SA-1B never did);
they are released at their own size. Masks are resized with pixel-centred nearest-neighbour
(OpenCV's INTER_NEAREST_EXACT, so a mask stays centred on the area-resized image: plain
INTER_NEAREST samples each block's top-left pixel and shifts masks by up to half a release pixel),
then area and bbox (SAM's convention, `rle.sam_bbox_xywh`) are recomputed from the resized RLE so
they describe exactly the released mask; a mask too thin to keep any pixel is dropped (SA-1B has
no empty masks). point_coords and crop_box are scaled by the same x/y factors.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import rle
from engine.records import ImageMeta, ImageRecord

RELEASE_SHORT_SIDE = 1500


def release_size(width: int, height: int, short_side: int = RELEASE_SHORT_SIDE) -> tuple[int, int]:
    """(width, height) in the release frame; `short_side` <= 0 keeps the store frame."""
    if short_side <= 0 or min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    if width <= height:
        return short_side, int(round(height * scale))
    return int(round(width * scale)), short_side


def resize_image(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """HxWx3 uint8 to height x width x 3 (area interpolation: downscaling only)."""
    import cv2

    if (rgb.shape[1], rgb.shape[0]) == (width, height):
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def rescale_record(record: ImageRecord, width: int, height: int) -> ImageRecord:
    """An ImageRecord moved to a width x height frame (see module docstring); masks that keep no
    pixel there are left out."""
    import cv2

    w0, h0 = record.image.width, record.image.height
    if (w0, h0) == (width, height):
        return record
    sx, sy = width / w0, height / h0
    masks = []
    for m in record.annotations:
        small = cv2.resize(
            rle.decode(m.segmentation).astype(np.uint8),
            (width, height),
            interpolation=cv2.INTER_NEAREST_EXACT,
        )
        segmentation = rle.encode(small)[0]
        area = int(rle.area([segmentation])[0])
        if area == 0:
            continue
        masks.append(
            dataclasses.replace(
                m,
                segmentation=segmentation,
                bbox=[float(v) for v in rle.sam_bbox_xywh([segmentation])[0]],
                area=area,
                crop_box=[
                    m.crop_box[0] * sx,
                    m.crop_box[1] * sy,
                    m.crop_box[2] * sx,
                    m.crop_box[3] * sy,
                ],
                point_coords=[[p[0] * sx, p[1] * sy] for p in m.point_coords],
            )
        )
    meta = ImageMeta(record.image.image_id, width, height, record.image.file_name)
    return ImageRecord(meta, masks)
