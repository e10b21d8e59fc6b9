"""What every benchmarked engine does: encode the prompt pair, run one guided denoiser step, decode.

The conditioning is a dict of numpy arrays as the engine's families build it (engine/families):
``embeds`` (the denoiser's text states, [negative, prompt] on the batch axis when guidance is on, as
diffusers orders it) and ``pooled`` (SDXL/SD3/FLUX pooled text embeddings, None for SD 1.5). Every engine
denoises with the reference engine's conditioning, so a step comparison is the denoiser's alone.
"""

from __future__ import annotations

import numpy as np


class Engine:
    def encode(self, prompt: str, negative: str, guidance: float) -> dict:
        """Both prompts (one without guidance) through the text encoders → {"embeds", "pooled"}."""
        raise NotImplementedError

    def step(self, latents: np.ndarray, t, cond: dict, guidance: float) -> np.ndarray:
        """One denoiser evaluation as the family's pipeline runs it (classifier-free guidance as a batch of
        two where the family uses it): latents as the scheduler holds them (FLUX: packed) → prediction."""
        raise NotImplementedError

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(1, C, h, w) latents (unscaled, unpacked) → (H, W, 3) uint8 image."""
        raise NotImplementedError


def cfg(output: np.ndarray, guidance: float) -> np.ndarray:
    uncond, cond = output[:1], output[1:2]
    return uncond + np.float32(guidance) * (cond - uncond)
