"""The tutorial's Vision Transformer, with a flag that runs it on vitriton's fused kernels."""

from vit.image import CAT_PATH, load_image
from vit.model import (
    PRESETS,
    EncoderBlock,
    FeedForward,
    MultiHeadAttention,
    PatchEmbedding,
    ViT,
    ViTConfig,
    create_model,
    resample_pos_embed,
)
from vit.summary import count_parameters, summary

__all__ = [
    "CAT_PATH",
    "PRESETS",
    "EncoderBlock",
    "FeedForward",
    "MultiHeadAttention",
    "PatchEmbedding",
    "ViT",
    "ViTConfig",
    "count_parameters",
    "create_model",
    "load_image",
    "resample_pos_embed",
    "summary",
]
