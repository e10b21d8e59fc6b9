"""Flow-matching sigma shifts: resolution-dependent `mu` (FLUX, SD3, Qwen-Image) and terminal stretch."""

from __future__ import annotations

import math

import numpy as np


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu for dynamic shifting: linear in the number of image tokens (diffusers' pipeline_flux.py)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
    """SD3's fixed shift: sigma' = s·sigma / (1 + (s - 1)·sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(time_shift_type: str, mu: float, sigmas: np.ndarray, exponent: float = 1.0) -> np.ndarray:
    """Dynamic shift by mu: exponential uses e^mu as the shift, linear uses mu itself."""
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** exponent)
    if time_shift_type == "linear":
        return mu / (mu + (1 / sigmas - 1) ** exponent)
    raise ValueError(f"unsupported time_shift_type={time_shift_type!r}")


def stretch_shift_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Rescale so the last sigma equals `shift_terminal` while sigma=1 stays put."""
    one_minus_z = 1 - sigmas
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - one_minus_z / scale_factor
