"""DDIM (Song et al. 2020), diffusers' DDIMScheduler: deterministic at eta=0, DDPM-like at eta=1."""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, AlphaProductMixin, Scheduler, SchedulerOutput, as_float32
from .prediction import ALPHA_PREDICTION_TYPES, clip_or_threshold, x0_and_epsilon
from .spacing import spaced_timesteps


class DDIMScheduler(AlphaProductMixin, Scheduler):
    name = "DDIMScheduler"
    sampler_name = "DDIM"
    order = 1
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    choices = {"prediction_type": ALPHA_PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._setup_noise_schedule()
        # alpha_bar "before" the first training step: 1 (clean), or alpha_bar_0 as SD 1.x ships.
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(0, self.config.num_train_timesteps)[::-1].astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu=None) -> None:
        self._refuse_schedule_args(timesteps=timesteps, sigmas=sigmas, mu=mu)
        if num_inference_steps is None:
            raise ValueError(f"{self.name}: pass num_inference_steps")
        config = self.config
        if num_inference_steps > config.num_train_timesteps:
            raise ValueError(
                f"{self.name}: num_inference_steps={num_inference_steps} cannot be larger than "
                f"num_train_timesteps={config.num_train_timesteps}"
            )
        self.num_inference_steps = num_inference_steps
        spaced = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, num_inference_steps)
        timesteps = spaced.round().astype(np.int64)
        if config.timestep_spacing == "leading":
            timesteps += config.steps_offset
        self.timesteps = timesteps

    def _alpha_products(self, timestep: int, prev_timestep: int):
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return alpha_prod_t, alpha_prod_t_prev

    def _get_variance(self, timestep: int, prev_timestep: int):
        alpha_prod_t, alpha_prod_t_prev = self._alpha_products(timestep, prev_timestep)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        return beta_prod_t_prev / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        *,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> SchedulerOutput:
        self._require_timesteps()
        config = self.config
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        timestep = int(timestep)
        # diffusers steps back by T // N whatever the spacing; kept for identical numbers.
        prev_timestep = timestep - config.num_train_timesteps // self.num_inference_steps

        alpha_prod_t, alpha_prod_t_prev = self._alpha_products(timestep, prev_timestep)
        beta_prod_t = 1 - alpha_prod_t

        x0, epsilon = x0_and_epsilon(config.prediction_type, model_output, sample, alpha_prod_t, beta_prod_t)
        x0 = clip_or_threshold(x0, config)

        # Eq. 16 of the DDIM paper: sigma_t = eta * sqrt(variance).
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * np.sqrt(variance)
        if use_clipped_model_output:
            epsilon = (sample - np.sqrt(alpha_prod_t) * x0) / np.sqrt(beta_prod_t)

        # Eq. 12: the direction pointing to x_t, then x_{t-1}.
        direction = np.sqrt(1 - alpha_prod_t_prev - std_dev_t * std_dev_t) * epsilon
        prev_sample = np.sqrt(alpha_prod_t_prev) * x0 + direction

        if eta > 0:
            if noise is not None and generator is not None:
                raise ValueError(f"{self.name}: pass either generator or noise, not both")
            prev_sample = prev_sample + std_dev_t * self._noise(model_output.shape, generator, noise)

        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), pred_original_sample=x0)
