"""Turning a model output into x0 (and epsilon) for the alpha-bar schedulers (DDPM, DDIM, LCM)."""

from __future__ import annotations

import numpy as np

from .thresholding import dynamic_threshold

ALPHA_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def x0_and_epsilon(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_prod_t, beta_prod_t
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted x0, predicted noise) from a model output of the given type at alpha_bar_t."""
    sqrt_alpha, sqrt_beta = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
    if prediction_type == "epsilon":
        return (sample - sqrt_beta * model_output) / sqrt_alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_alpha * model_output) / sqrt_beta
    if prediction_type == "v_prediction":
        return sqrt_alpha * sample - sqrt_beta * model_output, sqrt_alpha * model_output + sqrt_beta * sample
    raise ValueError(f"unsupported prediction_type={prediction_type!r}")


def clip_or_threshold(x0: np.ndarray, config) -> np.ndarray:
    """Dynamic thresholding when enabled, else plain clipping when clip_sample is set."""
    if config.get("thresholding"):
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.get("clip_sample"):
        return np.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0
