"""Shared machinery of the sigma-parameterised discrete schedulers (Euler, Euler Ancestral, Heun).

These work in k-diffusion's variance-exploding form: x = x0 + sigma·noise, with the model
input scaled by 1/sqrt(sigma² + 1) to match the variance-preserving UNet.
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler, broadcast_per_sample
from .sigmas import exponential_sigmas, karras_sigmas, training_sigmas
from .spacing import spaced_timesteps


class SigmaScheduler(Scheduler):
    sigmas: np.ndarray
    timesteps: np.ndarray

    def _spaced_float_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """float32 timesteps for the configured spacing (steps_offset only shifts `leading`)."""
        config = self.config
        timesteps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, num_inference_steps)
        timesteps = timesteps.astype(np.float32)
        if config.timestep_spacing == "leading":
            timesteps += np.float32(config.steps_offset)
        return timesteps

    def _training_sigmas(self) -> np.ndarray:
        return training_sigmas(self.alphas_cumprod)

    def _convert_sigmas(self, kind: str, in_sigmas: np.ndarray, num_steps: int) -> np.ndarray:
        """Karras or exponential respacing between the configured (or the table's) extreme sigmas."""
        sigma_min = self.config.get("sigma_min")
        sigma_max = self.config.get("sigma_max")
        sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
        if kind == "karras":
            return karras_sigmas(sigma_min, sigma_max, num_steps)
        return exponential_sigmas(sigma_min, sigma_max, num_steps)

    @property
    def init_noise_sigma(self) -> float:
        """Std of the starting latents: sigma_max, or sqrt(sigma_max² + 1) for `leading` spacing."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + 1))

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """Divide by sqrt(sigma² + 1) so the UNet sees unit-variance input."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        sample = np.asarray(sample)
        return (sample / np.sqrt(sigma * sigma + 1)).astype(sample.dtype)

    def _check_float_timestep(self, timestep) -> None:
        # diffusers refuses integers here: they are usually loop indices from enumerate().
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            raise ValueError(f"{self.name}.step takes one of scheduler.timesteps (a float), not an integer index")

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x0 + sigma(t)·noise at the given schedule timesteps."""
        original_samples = np.asarray(original_samples)
        dtype = original_samples.dtype
        sigmas = self.sigmas.astype(dtype)
        timesteps = np.atleast_1d(np.asarray(timesteps))
        indices = self._noise_indices(timesteps)
        sigma = broadcast_per_sample(sigmas[indices], original_samples.ndim)
        return (original_samples + np.asarray(noise, dtype=dtype) * sigma).astype(dtype)
