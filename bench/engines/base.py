"""What every benchmarked engine does: encode the prompt pair, run one guided denoiser step, decode."""

from __future__ import annotations

import numpy as np


class Engine:
    def encode(self, prompt: str, negative: str) -> np.ndarray:
        """Both prompts through the text encoder → (2, 77, D) states, [negative, prompt] as diffusers orders."""
        raise NotImplementedError

    def step(self, latents: np.ndarray, t, embeds: np.ndarray, guidance: float) -> np.ndarray:
        """One classifier-free-guided denoiser evaluation: (1, C, h, w) latents → guided noise prediction."""
        raise NotImplementedError

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(1, C, h, w) latents (unscaled) → (H, W, 3) uint8 image."""
        raise NotImplementedError


def cfg(output: np.ndarray, guidance: float) -> np.ndarray:
    uncond, cond = output[:1], output[1:2]
    return uncond + np.float32(guidance) * (cond - uncond)
