"""LCM's guidance-scale embedding, fed to the UNet as `timestep_cond`."""

from __future__ import annotations

import math

import numpy as np


def guidance_scale_embedding(w, embedding_dim: int = 512) -> np.ndarray:
    """Sinusoidal embedding of w·1000, float32 (len(w), embedding_dim) (VDM's timestep embedding).

    The LCM pipeline passes w = guidance_scale - 1 (it uses the Imagen CFG formulation).
    The frequencies are exp() rounded correctly to float32; torch's MKL exp is sometimes one
    float32 step off, which after multiplying by w·1000 moves a few high-w entries by ~1e-5.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 1:
        raise ValueError(f"guidance_scale_embedding: w must be 1-D, got shape {w.shape}")
    w = w * np.float32(1000.0)
    half_dim = embedding_dim // 2
    # diffusers: log(tensor(10000.)) in float32, divided by (half_dim - 1) in float32.
    scale = np.float32(math.log(10000.0)) / np.float32(half_dim - 1)
    exponents = np.arange(half_dim, dtype=np.float32) * -scale
    frequencies = np.exp(exponents.astype(np.float64)).astype(np.float32)
    angles = w[:, None] * frequencies[None, :]
    embedding = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if embedding_dim % 2 == 1:
        embedding = np.pad(embedding, ((0, 0), (0, 1)))
    return embedding.astype(np.float32)
