"""Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2), diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, SchedulerOutput, as_float32
from .betas import torch_linspace_f32
from .sigma_base import SigmaScheduler
from .sigmas import interp_sigmas, sigma_to_t, sigmas_to_timesteps


class EulerDiscreteScheduler(SigmaScheduler):
    name = "EulerDiscreteScheduler"
    sampler_name = "Euler"
    order = 1
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    choices = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": ("linear", "log_linear"),
        "timestep_spacing": TIMESTEP_SPACINGS,
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    fixed = {"use_beta_sigmas": (False, "beta sigmas need scipy's beta.ppf")}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if self.config.use_karras_sigmas and self.config.use_exponential_sigmas:
            raise ValueError(f"{self.name}: use only one of use_karras_sigmas and use_exponential_sigmas")
        self._setup_noise_schedule(pin_terminal=True)
        sigmas = self._training_sigmas()[::-1]
        num_train_timesteps = self.config.num_train_timesteps
        timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].astype(np.float32)
        self.timesteps = self._continuous_timesteps(sigmas) if self._uses_continuous_timesteps() else timesteps
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.is_scale_input_called = False

    def _uses_continuous_timesteps(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @staticmethod
    def _continuous_timesteps(sigmas: np.ndarray) -> np.ndarray:
        # EDM-style c_noise = log(sigma) / 4, for v-prediction models trained that way (CosXL).
        return (np.float32(0.25) * np.log(sigmas.astype(np.float32))).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu=None) -> None:
        self._refuse_schedule_args(mu=mu)
        config = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError(f"{self.name}: pass only one of timesteps or sigmas")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError(f"{self.name}: pass num_inference_steps, timesteps or sigmas")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError(f"{self.name}: pass only one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and (config.use_karras_sigmas or config.use_exponential_sigmas):
            raise ValueError(f"{self.name}: custom timesteps cannot be combined with karras/exponential sigmas")
        if timesteps is not None and self._uses_continuous_timesteps():
            raise ValueError(f"{self.name}: custom timesteps cannot be used with continuous timesteps")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps

        training = self._training_sigmas()
        log_sigmas = np.log(training)
        if sigmas is not None:
            # Explicit sigmas include the final one; timesteps are where they fall on the training table.
            sigmas = np.asarray(sigmas).astype(np.float32)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas[:-1]])
        else:
            if timesteps is not None:
                timesteps = np.asarray(timesteps).astype(np.float32)
            else:
                timesteps = self._spaced_float_timesteps(num_inference_steps)
            if config.interpolation_type == "linear":
                sigmas = interp_sigmas(timesteps, training)
            else:
                log_sigmas_ramp = torch_linspace_f32(np.log(training[-1]), np.log(training[0]), num_inference_steps + 1)
                sigmas = np.exp(log_sigmas_ramp)
            if config.use_karras_sigmas or config.use_exponential_sigmas:
                kind = "karras" if config.use_karras_sigmas else "exponential"
                sigmas = self._convert_sigmas(kind, sigmas, num_inference_steps)
                timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
            if config.final_sigmas_type == "sigma_min":
                sigma_last = training[0]
            else:
                sigma_last = 0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        self.sigmas = sigmas.astype(np.float32)
        if self._uses_continuous_timesteps():
            self.timesteps = self._continuous_timesteps(self.sigmas[:-1])
        else:
            self.timesteps = np.asarray(timesteps).astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        *,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> SchedulerOutput:
        self._check_float_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        config = self.config

        sigma = self.sigmas[self._step_index]
        # Optional "churn": raise the noise level a little before the step (Karras Alg. 2, gamma).
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            eps = self._noise(model_output.shape, generator, noise) * s_noise
            sample = sample + eps * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)

        if config.prediction_type in ("original_sample", "sample"):
            x0 = model_output
        elif config.prediction_type == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)

        derivative = (sample - x0) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), pred_original_sample=x0)
