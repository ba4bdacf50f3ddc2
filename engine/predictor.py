"""`SamPredictor`: encode an image once, then answer many point/box/mask prompts from its embedding.

Meta's interface (`set_image`, `predict`, `predict_torch`, `get_image_embedding`, `reset_image`),
with `ValueError` for bad inputs instead of asserts. The image state (embedding plus the two sizes
needed to map prompts and masks) can be taken out as an `ImageEmbedding`, saved to `.npz` and put
into another predictor, so encoding and interactive decoding can run in different processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine import heap
from engine.atomic import atomic_write_bytes
from engine.modeling import Sam
from engine.transforms import ResizeLongestSide


@dataclass
class ImageEmbedding:
    """The predictor's image state: everything decoding needs, nothing of the pixels.

    Attributes:
      features (torch.Tensor): 1xCxHxW float32 image embedding (1x256x64x64 for SAM).
      input_size (tuple[int, int]): (h, w) of the image after the longest-side resize.
      original_size (tuple[int, int]): (H, W) of the original image.
      encoder_fingerprint (str | None): identifies the image encoder's weights (see
        `encoder_fingerprint`), so an embedding is never decoded against another encoder.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    encoder_fingerprint: str | None = None

    def to_bytes(self) -> bytes:
        """The .npz bytes `save` writes (the shard store keeps embeddings as these bytes)."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            features=self.features.detach().to("cpu", torch.float32).numpy(),
            input_size=np.asarray(self.input_size, np.int64),
            original_size=np.asarray(self.original_size, np.int64),
            encoder_fingerprint=np.asarray(self.encoder_fingerprint or ""),
        )
        return buffer.getvalue()

    def save(self, path: str | Path) -> None:
        """Write to an .npz file (atomically)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "ImageEmbedding":
        return cls.from_bytes(path, name=str(path))

    @classmethod
    def from_bytes(
        cls, source: str | Path | bytes, name: str = "image embedding"
    ) -> "ImageEmbedding":
        """Read what `to_bytes` / `save` wrote (bytes or a file path); `name` labels errors."""
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        path = name
        try:
            with np.load(source) as data:
                features = torch.from_numpy(np.array(data["features"], np.float32))
                input_size = tuple(int(v) for v in data["input_size"])
                original_size = tuple(int(v) for v in data["original_size"])
                fingerprint = (
                    str(data["encoder_fingerprint"]) if "encoder_fingerprint" in data else ""
                )
        except (OSError, KeyError, ValueError) as exc:
            # numpy takes any file that is not an archive for a pickle, and says so
            detail = "it is not a .npz archive" if "allow_pickle" in str(exc) else str(exc)
            raise ValueError(
                f"{path}: not an image-embedding file written by ImageEmbedding.save or "
                f"`predict --save-embedding` ({detail})"
            ) from None
        if (
            features.ndim != 4
            or features.shape[0] != 1
            or len(input_size) != 2
            or len(original_size) != 2
        ):
            raise ValueError(f"{path}: malformed image embedding (features {list(features.shape)})")
        return cls(features, input_size, original_size, fingerprint or None)


def encoder_fingerprint(sam: Sam, tensors: int = 4) -> str:
    """Short hash of the image encoder's last `tensors` parameters (its output layers).

    Cheap (a few MB hashed for vit_h) and changes whenever the encoder is retrained or swapped;
    a decoder-only fine-tune keeps it, and embeddings stay valid then.
    """
    digest = hashlib.sha256()
    for name, param in list(sam.image_encoder.named_parameters())[-tensors:]:
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class SamPredictor:
    def __init__(self, sam_model: Sam, *, autocast_dtype: torch.dtype | None = None) -> None:
        """
        Arguments:
          sam_model (Sam): the model (its device is used for every computation).
          autocast_dtype (torch.dtype | None): e.g. torch.bfloat16 to run encoder and decoder under
            autocast; outputs are returned as float32. None runs in the model's dtype.
        """
        heap.reuse_freed_memory()  # the decoder's large temporaries: no fresh pages per call
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.img_size)
        self.autocast_dtype = autocast_dtype
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the embedding of an HxWx3 uint8 image ("RGB" or "BGR" channel order)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if (
            not isinstance(image, np.ndarray)
            or image.ndim != 3
            or image.shape[2] != 3
            or image.dtype != np.uint8
        ):
            described = (
                f"{image.dtype} {image.shape}"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
            raise ValueError(f"set_image expects an HxWx3 uint8 numpy array, got {described}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"set_image got an empty image of shape {image.shape}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = (
            torch.as_tensor(resized, device=self.device)
            .permute(2, 0, 1)
            .contiguous()[None, :, :, :]
        )
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Compute the embedding of a 1x3xhxw image already resized so that max(h, w) == img_size."""
        shape = tuple(transformed_image.shape)
        if (
            len(shape) != 4
            or shape[0] != 1
            or shape[1] != 3
            or max(shape[2:]) != self.model.img_size
        ):
            raise ValueError(
                f"set_torch_image expects 1x3xhxw with max(h, w) == {self.model.img_size}, got {list(shape)}; "
                "resize with predictor.transform.apply_image first"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(shape[2]), int(shape[3]))
        with self._autocast():
            features = self.model.image_encoder(self.model.preprocess(transformed_image))
        self.features = features.float()
        self.is_image_set = True

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt (any mix of points, one box, a previous low-res mask).

        Arguments:
          point_coords (np.ndarray | None): Nx2 (x, y) in original-image pixels.
          point_labels (np.ndarray | None): N labels, 1 foreground, 0 background.
          box (np.ndarray | None): 4 (or 1x4) XYXY in original-image pixels.
          mask_input (np.ndarray | None): 1x256x256 low-res logits from a previous call.
          multimask_output (bool): 3 masks (ambiguous prompts) instead of 1.
          return_logits (bool): return logits instead of binary masks.
        Returns:
          (np.ndarray): CxHxW masks (bool, or float32 logits), original size; C = 3 or 1.
          (np.ndarray): C predicted IoUs (float32, not sorted).
          (np.ndarray): Cx256x256 low-res logits (float32), usable as the next mask_input.
        """
        self._require_image()
        coords_torch = labels_torch = box_torch = mask_torch = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _check_points(point_coords, point_labels)
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_torch = torch.as_tensor(coords, dtype=torch.float, device=self.device)[
                None, :, :
            ]
            labels_torch = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None, :]
        if box is not None:
            box = np.asarray(box, dtype=float)
            if box.size != 4 or not np.isfinite(box).all():
                raise ValueError(
                    f"box must hold 4 finite numbers XYXY (one box), got shape {box.shape}"
                )
            box = self.transform.apply_boxes(box.reshape(4), self.original_size)
            box_torch = torch.as_tensor(box, dtype=torch.float, device=self.device)[None, :]
        if mask_input is not None:
            mask_input = np.asarray(mask_input)
            expected = (1, *self.model.prompt_encoder.mask_input_size)
            if mask_input.shape != expected:
                raise ValueError(
                    f"mask_input must be {'x'.join(map(str, expected))} low-res logits (one row of a previous "
                    f"call's low_res_logits, e.g. logits[best][None]), got shape {mask_input.shape}"
                )
            mask_torch = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[
                None, :, :, :
            ]
        masks, iou_predictions, low_res = self.predict_torch(
            coords_torch,
            labels_torch,
            box_torch,
            mask_torch,
            multimask_output,
            return_logits=return_logits,
        )
        return (
            masks[0].detach().cpu().numpy(),
            iou_predictions[0].detach().float().cpu().numpy(),
            low_res[0].detach().float().cpu().numpy(),
        )

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for a batch of B prompts on the current image; inputs are already in the resized frame.

        Coordinates keep their dtype until the positional encoding (float64 grid points from the
        automatic generator are normalised in float64, as in Meta's code).
        Arguments:
          point_coords (torch.Tensor | None): BxNx2 (x, y), resized input frame.
          point_labels (torch.Tensor | None): BxN, 1 foreground, 0 background.
          boxes (torch.Tensor | None): Bx4 XYXY, resized input frame.
          mask_input (torch.Tensor | None): Bx1x256x256 low-res logits.
          multimask_output (bool): 3 masks per prompt instead of 1.
          return_logits (bool): return logits instead of binary masks.
        Returns:
          (torch.Tensor): BxCxHxW masks (bool) or float32 logits at the original size.
          (torch.Tensor): BxC predicted IoUs.
          (torch.Tensor): BxCx256x256 low-res logits.
        """
        self._require_image()
        points = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError("point_coords and point_labels must be given together")
            if (
                point_coords.ndim != 3
                or point_coords.shape[-1] != 2
                or point_labels.shape != point_coords.shape[:2]
            ):
                raise ValueError(
                    f"point_coords must be BxNx2 and point_labels BxN, got {list(point_coords.shape)} "
                    f"and {list(point_labels.shape)}"
                )
            points = (point_coords, point_labels)
        if boxes is not None and (boxes.shape[-1] != 4 or boxes.ndim not in (2, 3)):
            raise ValueError(f"boxes must be Bx4 XYXY, got {list(boxes.shape)}")
        if mask_input is not None and (mask_input.ndim != 4 or mask_input.shape[1] != 1):
            raise ValueError(f"mask_input must be Bx1x256x256 logits, got {list(mask_input.shape)}")
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            low_res, iou_predictions = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        low_res = low_res.float()
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions.float(), low_res

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, 1xCxHxW (1x256x64x64)."""
        self._require_image()
        return self.features

    def get_image_state(self) -> ImageEmbedding:
        """The current image state, to save or to hand to another predictor."""
        self._require_image()
        return ImageEmbedding(
            self.features.detach().cpu().clone(),
            self.input_size,
            self.original_size,
            encoder_fingerprint(self.model),
        )

    def set_image_state(self, state: ImageEmbedding) -> None:
        """Restore an image state taken from a predictor with the same model (skips the encoder)."""
        channels = self.model.prompt_encoder.embed_dim
        expected = (1, channels, *self.model.prompt_encoder.image_embedding_size)
        if tuple(state.features.shape) != expected:
            raise ValueError(
                f"image embedding has shape {list(state.features.shape)} but this model expects "
                f"{list(expected)}: it was computed with another model"
            )
        if state.encoder_fingerprint and state.encoder_fingerprint != encoder_fingerprint(
            self.model
        ):
            raise ValueError(
                f"image embedding was computed with another image encoder (fingerprint "
                f"{state.encoder_fingerprint}, this model's is {encoder_fingerprint(self.model)}): re-encode the image"
            )
        if max(state.input_size) != self.model.img_size:
            raise ValueError(
                f"image embedding input_size {state.input_size} does not fit img_size {self.model.img_size}"
            )
        self.reset_image()
        self.features = state.features.to(self.device, torch.float32)
        self.input_size = (int(state.input_size[0]), int(state.input_size[1]))
        self.original_size = (int(state.original_size[0]), int(state.original_size[1]))
        self.is_image_set = True

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError(
                "no image is set: call set_image() (or set_image_state()) before predicting"
            )

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            yield


def _check_points(
    point_coords: np.ndarray | None, point_labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if point_coords is None or point_labels is None:
        raise ValueError(
            "point_coords and point_labels must be given together (labels: 1 foreground, 0 background)"
        )
    coords = np.asarray(point_coords, dtype=float)
    labels = np.asarray(point_labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise ValueError(f"point_coords must be Nx2 (x, y) with N >= 1, got shape {coords.shape}")
    if labels.shape != (coords.shape[0],):
        raise ValueError(
            f"point_labels must hold one label per point ({coords.shape[0]}), got shape {labels.shape}"
        )
    if not np.isfinite(coords).all():
        raise ValueError("point_coords must be finite numbers")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError(
            f"point_labels must be 1 (foreground), 0 (background) or -1 (padding, ignored), got {sorted(set(labels.tolist()))}"
        )
    return coords, labels
