"""HiDream-I1 (diffusers ``HiDreamImagePipeline``): its components' graphs and tiny builds."""

from __future__ import annotations

from .moe import dense_moe, dense_moe_forward
from .transformer import max_seq, patch_tokens, tiny_transformer, transformer_component

__all__ = [
    "dense_moe",
    "dense_moe_forward",
    "max_seq",
    "patch_tokens",
    "tiny_transformer",
    "transformer_component",
]
