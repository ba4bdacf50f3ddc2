"""SAM's parts, one per module; `Sam` takes them as constructor arguments so encoders are pluggable."""

from engine.modeling.image_encoder import ImageEncoderViT
from engine.modeling.mask_decoder import MaskDecoder
from engine.modeling.prompt_encoder import PromptEncoder
from engine.modeling.sam import Sam
from engine.modeling.transformer import TwoWayTransformer

__all__ = ["ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam", "TwoWayTransformer"]
