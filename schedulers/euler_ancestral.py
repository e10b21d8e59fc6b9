"""Ancestral Euler sampling (k-diffusion's sample_euler_ancestral), diffusers' EulerAncestralDiscreteScheduler.

Each step goes deterministically down to sigma_down, then adds fresh noise of std sigma_up,
so sigma_down² + sigma_up² = sigma_next².
"""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, SchedulerOutput, as_float32
from .sigma_base import SigmaScheduler
from .sigmas import interp_sigmas


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    name = "EulerAncestralDiscreteScheduler"
    sampler_name = "Euler a"
    order = 1
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    choices = {"prediction_type": ("epsilon", "v_prediction"), "timestep_spacing": TIMESTEP_SPACINGS}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._setup_noise_schedule(pin_terminal=True)
        sigmas = self._training_sigmas()
        self.sigmas = np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32)
        num_train_timesteps = self.config.num_train_timesteps
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy()
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu=None) -> None:
        self._refuse_schedule_args(timesteps=timesteps, sigmas=sigmas, mu=mu)
        if num_inference_steps is None:
            raise ValueError(f"{self.name}: pass num_inference_steps")
        self.num_inference_steps = num_inference_steps
        timesteps = self._spaced_float_timesteps(num_inference_steps)
        sigmas = interp_sigmas(timesteps, self._training_sigmas())
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        *,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> SchedulerOutput:
        self._check_float_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)

        sigma = self.sigmas[self._step_index]
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)

        sigma_from, sigma_to = sigma, self.sigmas[self._step_index + 1]
        sigma_up = np.sqrt(
            sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)
        )
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)

        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        # Noise is drawn on every step (also the last, where sigma_up is 0) so a seeded
        # generator yields the same stream whatever the step count.
        prev_sample = prev_sample + self._noise(model_output.shape, generator, noise) * sigma_up
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), pred_original_sample=x0)
