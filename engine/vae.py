"""Latents → pixels: the VAE decoder with the model's scaling and shift, then 8-bit RGB as diffusers makes it."""

from __future__ import annotations

import numpy as np

from .session import Graph


class VaeDecoder:
    def __init__(self, graph: Graph, scaling_factor: float, shift_factor: float | None):
        self.graph = graph
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor or 0.0

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """(1, C, h, w) latents → (H, W, 3) uint8, as diffusers' VaeImageProcessor.postprocess(output_type="pil")."""
        scaled = latents / self.scaling_factor + self.shift_factor
        image = self.graph(latent_sample=scaled.astype(np.float32))["sample"][0]
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
