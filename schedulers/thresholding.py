"""Imagen's dynamic thresholding of the predicted x0 (arXiv 2205.11487), as diffusers applies it."""

from __future__ import annotations

import numpy as np


def _torch_style_quantile(sorted_rows: np.ndarray, q: float) -> np.ndarray:
    """Linear-interpolated quantile of each sorted row, rounded as torch.quantile does (float32 rank, lerp)."""
    count = sorted_rows.shape[1]
    rank = np.float32(q) * np.float32(count - 1)
    below = int(np.floor(rank))
    above = min(below + 1, count - 1)
    weight = np.float32(rank - np.float32(below))
    low, high = sorted_rows[:, below], sorted_rows[:, above]
    # torch.lerp picks the form that is exact at the nearer end.
    if weight < 0.5:
        return low + weight * (high - low)
    return high - (high - low) * (np.float32(1.0) - weight)


def dynamic_threshold(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Clamp each sample to [-s, s] and divide by s, s = the `ratio` quantile of |x| clipped to [1, max_value]."""
    batch, channels = sample.shape[:2]
    flat = sample.astype(np.float32).reshape(batch, -1)
    s = _torch_style_quantile(np.sort(np.abs(flat), axis=1), ratio)
    s = np.clip(s, 1, max_value).astype(np.float32)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(sample.dtype)
