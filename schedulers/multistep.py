"""Shared machinery of the multistep exponential-integrator solvers (DPM-Solver++, UniPC).

They work in the variance-preserving form x_t = alpha_t·x0 + sigma_t·noise, with
lambda_t = log(alpha_t / sigma_t); with use_flow_sigmas, alpha_t = 1 - sigma and sigma_t = sigma
(rectified flow). A history of converted model outputs feeds the higher-order updates.
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler, broadcast_per_sample
from .sigmas import exponential_sigmas, karras_sigmas, training_sigmas
from .thresholding import dynamic_threshold


class MultistepScheduler(Scheduler):
    sigmas: np.ndarray
    timesteps: np.ndarray

    def _setup_multistep(self) -> None:
        self._setup_noise_schedule(pin_terminal=True)
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = np.log(alpha_t) - np.log(sigma_t)
        self.sigmas = training_sigmas(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        num_train_timesteps = self.config.num_train_timesteps
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.model_outputs: list[np.ndarray | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _alpha_sigma(self, sigma):
        """(alpha_t, sigma_t) of the VP (or flow) form for a k-diffusion sigma."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha_t = 1 / np.sqrt(sigma * sigma + 1)
        return alpha_t, sigma * alpha_t

    def _lambda(self, sigma):
        """(alpha_t, sigma_t, lambda_t); lambda is +inf at sigma = 0, which the updates rely on."""
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        with np.errstate(divide="ignore"):
            return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)

    def _convert_sigmas(self, kind: str, in_sigmas: np.ndarray, num_steps: int) -> np.ndarray:
        sigma_min = self.config.get("sigma_min")
        sigma_max = self.config.get("sigma_max")
        sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
        if kind == "karras":
            return karras_sigmas(sigma_min, sigma_max, num_steps)
        return exponential_sigmas(sigma_min, sigma_max, num_steps)

    def _threshold(self, x0: np.ndarray) -> np.ndarray:
        config = self.config
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)

    def index_for_timestep(self, timestep, schedule_timesteps: np.ndarray | None = None) -> int:
        """As the base class, but a timestep not in the schedule means the last step (diffusers)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        matches = np.flatnonzero(schedule == timestep)
        if len(matches) == 0:
            return len(self.timesteps) - 1
        return int(matches[1] if len(matches) > 1 else matches[0])

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """alpha_t·x0 + sigma_t·noise at the given schedule timesteps."""
        original_samples = np.asarray(original_samples)
        dtype = original_samples.dtype
        sigmas = self.sigmas.astype(dtype)
        timesteps = np.atleast_1d(np.asarray(timesteps))
        indices = self._noise_indices(timesteps)
        sigma = broadcast_per_sample(sigmas[indices], original_samples.ndim)
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        return (alpha_t * original_samples + sigma_t * np.asarray(noise, dtype=dtype)).astype(dtype)

    def _push_model_output(self, model_output: np.ndarray) -> None:
        self.model_outputs = self.model_outputs[1:] + [model_output]
