"""Heun's 2nd-order method (Karras et al. 2022, Alg. 1), diffusers' HeunDiscreteScheduler.

Every step but the last takes two model calls: the schedule lists each inner timestep twice,
and the scheduler alternates between a first-order (Euler) state and a correcting state.
"""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, SchedulerOutput, as_float32
from .sigma_base import SigmaScheduler
from .sigmas import interp_sigmas, sigmas_to_timesteps


class HeunDiscreteScheduler(SigmaScheduler):
    name = "HeunDiscreteScheduler"
    sampler_name = "Heun"
    order = 2
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"), "timestep_spacing": TIMESTEP_SPACINGS}
    fixed = {"use_beta_sigmas": (False, "beta sigmas need scipy's beta.ppf")}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if self.config.use_karras_sigmas and self.config.use_exponential_sigmas:
            raise ValueError(f"{self.name}: use only one of use_karras_sigmas and use_exponential_sigmas")
        self._setup_noise_schedule(extra_schedules=("exp",))
        self.set_timesteps(self.config.num_train_timesteps)
        self.num_inference_steps = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu=None) -> None:
        self._refuse_schedule_args(sigmas=sigmas, mu=mu)
        config = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{self.name}: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and (config.use_karras_sigmas or config.use_exponential_sigmas):
            raise ValueError(f"{self.name}: custom timesteps cannot be combined with karras/exponential sigmas")
        num_inference_steps = num_inference_steps or len(timesteps)
        self.num_inference_steps = num_inference_steps

        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.float32)
        else:
            timesteps = self._spaced_float_timesteps(num_inference_steps)
        training = self._training_sigmas()
        log_sigmas = np.log(training)
        sigmas = interp_sigmas(timesteps, training)
        if config.use_karras_sigmas or config.use_exponential_sigmas:
            kind = "karras" if config.use_karras_sigmas else "exponential"
            sigmas = self._convert_sigmas(kind, sigmas, num_inference_steps)
            timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)

        # Inner sigmas/timesteps appear twice: once for the Euler stage, once for the correction.
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.asarray(timesteps)
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]).astype(np.float32)

        self.prev_derivative = None
        self.dt = None
        self.sample = None
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
        """Deterministic; `generator` / `noise` are accepted (and unused) so every scheduler steps alike."""
        if self._step_index is None:
            self._init_step_index(timestep)
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        config = self.config

        if self.state_in_first_order:
            sigma = self.sigmas[self._step_index]
            sigma_next = self.sigmas[self._step_index + 1]
        else:
            sigma = self.sigmas[self._step_index - 1]
            sigma_next = self.sigmas[self._step_index]
        sigma_hat = sigma  # Heun here never adds churn (gamma = 0).

        # The correcting stage evaluated the model at sigma_next.
        sigma_input = sigma_hat if self.state_in_first_order else sigma_next
        if config.prediction_type == "epsilon":
            x0 = sample - sigma_input * model_output
        elif config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma_input / np.sqrt(sigma_input * sigma_input + 1)) + sample / (
                sigma_input * sigma_input + 1
            )
        else:  # sample
            x0 = model_output
        if config.clip_sample:
            x0 = np.clip(x0, -config.clip_sample_range, config.clip_sample_range)

        if self.state_in_first_order:
            derivative = (sample - x0) / sigma_hat
            dt = sigma_next - sigma_hat
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            # Average the slopes at both ends, restart from the sample before the Euler stage.
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative, self.dt, self.sample = None, None, None

        prev_sample = sample + derivative * dt
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), pred_original_sample=x0)
