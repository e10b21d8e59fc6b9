"""What the shared loop needs from a family, and the pieces families share."""

from __future__ import annotations

import numpy as np


def classifier_free_guidance(output: np.ndarray, scale: float) -> np.ndarray:
    """The batch is [unconditional, conditional], as diffusers orders it."""
    uncond, cond = output[:1], output[1:]
    return uncond + scale * (cond - uncond)


class Family:
    """A family of architectures; subclasses define how prompts and latents meet the denoiser graph."""

    #: components this family loads, in order: name → required?
    components: dict[str, bool] = {}
    denoiser_component = "unet"

    def __init__(self, manifest, graphs: dict, tokenizers: dict, model_index: dict):
        self.manifest, self.graphs, self.tokenizers, self.model_index = manifest, graphs, tokenizers, model_index
        self.config = manifest.config
        self.vae_scale_factor = int(self.config.get("vae_scale_factor", 8))
        self.latent_channels = int(self.config.get("latent_channels", 4))
        self.warnings: list[str] = []

    @staticmethod
    def tokenizer_lengths(config: dict) -> dict[str, int]:
        """Tokenizer windows that differ from the tokenizer's own model_max_length."""
        return {}

    # --- conditioning
    def encode(self, prompt: str, negative: str, guidance: float) -> dict:
        raise NotImplementedError

    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 1.0

    # --- latents
    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (1, self.latent_channels, height // f, width // f)

    def pack(self, latents: np.ndarray) -> np.ndarray:
        return latents

    def unpack(self, latents: np.ndarray, width: int, height: int) -> np.ndarray:
        return latents

    # --- schedule
    def set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        scheduler.set_timesteps(steps)

    def prepare(self, cond: dict, width: int, height: int, guidance: float) -> None:
        """Per-generation inputs that do not change across steps (ids, time ids, guidance embeddings)."""

    # --- the denoiser
    def denoise(self, latents: np.ndarray, t, cond: dict, guidance: float) -> np.ndarray:
        raise NotImplementedError

    def _note_truncation(self, encoder, truncated: bool):
        if truncated:
            self.warnings.append(
                f"the prompt is longer than {encoder.tokenizer.name}'s {encoder.max_length}-token window "
                f"and was truncated; shorten it to keep its end"
            )
