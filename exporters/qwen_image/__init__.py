"""Qwen-Image (diffusers' ``QwenImagePipeline``): its components' exports, one module per side."""

from .vae import config_keys as vae_config_keys
from .vae import tiny_vae, vae_decoder, vae_encoder

__all__ = ["tiny_vae", "vae_config_keys", "vae_decoder", "vae_encoder"]
