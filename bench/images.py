"""Decoded VAE output → 8-bit RGB as diffusers makes it, and the fidelity measures between two runs."""

from __future__ import annotations

import numpy as np


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] → (H, W, 3) uint8, as VaeImageProcessor.postprocess(output_type="pil")."""
    image = np.clip(np.asarray(decoded, dtype=np.float32)[0] / 2 + 0.5, 0.0, 1.0)
    return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images; inf when identical."""
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
