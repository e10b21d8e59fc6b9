"""Qwen-Image (diffusers ``QwenImagePipeline``): its components' graphs, tiny builds and checkpoint names."""

from __future__ import annotations

from .text import (
    KIND as TEXT_KIND,
)
from .text import (
    MAX_SEQUENCE_LENGTH,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_START_IDX,
    TOKENIZER_MAX_LENGTH,
    TextWeights,
    checkpoint_name,
    checkpoint_remap,
    language_model,
    text_encoder_component,
    tiny_text_encoder,
    tiny_tokenizer,
)
from .vae import config_keys as vae_config_keys
from .vae import tiny_vae, vae_decoder, vae_encoder

__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_START_IDX",
    "TEXT_KIND",
    "TOKENIZER_MAX_LENGTH",
    "TextWeights",
    "checkpoint_name",
    "checkpoint_remap",
    "language_model",
    "text_encoder_component",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "tiny_vae",
    "vae_config_keys",
    "vae_decoder",
    "vae_encoder",
]
