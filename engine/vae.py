"""Latents ↔ pixels through the VAE graphs, with the model's scaling and shift, as diffusers does it."""

from __future__ import annotations

import numpy as np

from .errors import EngineError
from .images import sample_latent_distribution


class Vae:
    """The export's VAE constants; the graphs come from the phase that runs them."""

    def __init__(self, config: dict):
        self.scaling_factor = float(config["vae_scaling_factor"])
        self.shift_factor = float(config.get("vae_shift_factor") or 0.0)

    def decode(self, graph, latents: np.ndarray) -> np.ndarray:
        """(1, C, h, w) latents → (H, W, 3) uint8, as diffusers' VaeImageProcessor.postprocess(output_type="pil")."""
        scaled = latents / self.scaling_factor + self.shift_factor
        image = graph(latent_sample=scaled.astype(np.float32))["sample"][0]
        if not np.isfinite(image).all():
            raise EngineError("the VAE decoder's output is NaN or infinite; export the model again")
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)

    def encode(self, graph, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(1, 3, H, W) pixels in [-1, 1] → scaled latents, sampled from the latent distribution as
        ``retrieve_latents(vae.encode(image), generator)`` does (one standard-normal draw of the mean's shape)."""
        parameters = graph(sample=pixels.astype(np.float32))["latent_parameters"]
        shape = (parameters.shape[0], parameters.shape[1] // 2, *parameters.shape[2:])
        latents = sample_latent_distribution(parameters, rng.standard_normal(shape, dtype=np.float32))
        return ((latents - np.float32(self.shift_factor)) * np.float32(self.scaling_factor)).astype(np.float32)
