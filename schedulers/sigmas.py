"""Noise-level (sigma) tables for the k-diffusion style schedulers, computed in float64 as diffusers does."""

from __future__ import annotations

import math

import numpy as np


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) per training step, float32, ascending in t."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps, linearly interpolated; float64."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5): evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def lu_lambdas(lambda_min: float, lambda_max: float, num_steps: int) -> np.ndarray:
    """Lu et al. 2022 (DPM-Solver++): evenly spaced in lambda = log(alpha / sigma)."""
    ramp = np.linspace(0, 1, num_steps)
    return lambda_max + ramp * (lambda_min - lambda_max)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep whose sigma is `sigma` (interpolated in log sigma)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    weight = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - weight) * low_idx + weight * high_idx
    return t.reshape(sigma.shape)


def sigmas_to_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    return np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
