"""DDPM ancestral sampling (Ho et al. 2020), diffusers' DDPMScheduler; DeepFloyd IF runs on it."""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, AlphaProductMixin, Scheduler, SchedulerOutput, as_float32
from .prediction import ALPHA_PREDICTION_TYPES, clip_or_threshold, x0_and_epsilon
from .spacing import spaced_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(AlphaProductMixin, Scheduler):
    name = "DDPMScheduler"
    sampler_name = "DDPM"
    order = 1
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    choices = {
        "variance_type": VARIANCE_TYPES,
        "prediction_type": ALPHA_PREDICTION_TYPES,
        "timestep_spacing": TIMESTEP_SPACINGS,
    }

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._setup_noise_schedule()
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.timesteps = np.arange(0, self.config.num_train_timesteps)[::-1].astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu=None) -> None:
        self._refuse_schedule_args(sigmas=sigmas, mu=mu)
        config = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{self.name}: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(later >= earlier for earlier, later in zip(timesteps, timesteps[1:], strict=False)):
                raise ValueError(f"{self.name}: custom timesteps must be in descending order")
            if timesteps[0] >= config.num_train_timesteps:
                raise ValueError(
                    f"{self.name}: timesteps must start below num_train_timesteps={config.num_train_timesteps}"
                )
            self.timesteps = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
            self.num_inference_steps = None
            return
        if num_inference_steps > config.num_train_timesteps:
            raise ValueError(
                f"{self.name}: num_inference_steps={num_inference_steps} cannot be larger than "
                f"num_train_timesteps={config.num_train_timesteps}"
            )
        self.num_inference_steps = num_inference_steps
        self.custom_timesteps = False
        spaced = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, num_inference_steps)
        timesteps = spaced.round().astype(np.int64)
        if config.timestep_spacing == "leading":
            timesteps += config.steps_offset
        self.timesteps = timesteps

    def previous_timestep(self, timestep: int) -> int:
        if self.custom_timesteps or self.num_inference_steps:
            index = int(np.flatnonzero(self.timesteps == timestep)[0])
            return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])
        return timestep - 1

    def _alpha_products(self, t: int, prev_t: int):
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        return alpha_prod_t, alpha_prod_t_prev

    def _get_variance(self, t: int, predicted_variance=None) -> np.ndarray:
        """The posterior variance for `variance_type` (log-variance for the *_log / learned_range types)."""
        alpha_prod_t, alpha_prod_t_prev = self._alpha_products(t, self.previous_timestep(t))
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        # beta tilde (eq. 7 of the DDPM paper), floored so its log stays finite.
        variance = np.maximum((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, np.float32(1e-20))
        variance_type = self.config.variance_type
        if variance_type == "fixed_small_log":
            return np.exp(0.5 * np.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return np.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            # The model interpolates between log beta tilde and log beta (Improved DDPM, eq. 15).
            min_log, max_log = np.log(variance), np.log(current_beta_t)
            frac = (predicted_variance + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        return variance

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        *,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> SchedulerOutput:
        config = self.config
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        t = int(timestep)
        prev_t = self.previous_timestep(t)

        predicted_variance = None
        channels = sample.shape[1]
        if config.variance_type in ("learned", "learned_range"):
            # The UNet's extra channels carry the variance (DeepFloyd IF: 6 out for 3 in).
            if model_output.shape[1] != channels * 2:
                raise ValueError(
                    f"{self.name}: variance_type={config.variance_type!r} needs a model output with twice the "
                    f"sample's channels ({channels * 2}), got {model_output.shape[1]}"
                )
            model_output, predicted_variance = model_output[:, :channels], model_output[:, channels:]

        alpha_prod_t, alpha_prod_t_prev = self._alpha_products(t, prev_t)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        x0, _ = x0_and_epsilon(config.prediction_type, model_output, sample, alpha_prod_t, beta_prod_t)
        x0 = clip_or_threshold(x0, config)

        # Posterior mean of q(x_{t-1} | x_t, x_0) (eq. 7 of the DDPM paper).
        x0_coeff = (np.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        sample_coeff = np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if t > 0:
            variance_noise = self._noise(model_output.shape, generator, noise)
            variance = self._get_variance(t, predicted_variance)
            if config.variance_type == "fixed_small_log":
                prev_sample = prev_sample + variance * variance_noise
            elif config.variance_type == "learned_range":
                prev_sample = prev_sample + np.exp(0.5 * variance) * variance_noise
            else:
                prev_sample = prev_sample + np.sqrt(variance) * variance_noise

        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), pred_original_sample=x0)
