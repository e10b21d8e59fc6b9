"""Latent consistency models' multistep sampling (Luo et al. 2023), diffusers' LCMScheduler.

Each step maps x_t straight to a denoised estimate via the consistency boundary condition,
then re-noises it to the next (much lower) timestep.
"""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, AlphaProductMixin, Scheduler, SchedulerOutput, as_float32
from .prediction import ALPHA_PREDICTION_TYPES, clip_or_threshold, x0_and_epsilon

SIGMA_DATA = 0.5


class LCMScheduler(AlphaProductMixin, Scheduler):
    name = "LCMScheduler"
    sampler_name = "LCM"
    strength_in_schedule = True
    order = 1
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }
    # timestep_spacing is stored but unused: LCM always takes its own skipping schedule.
    choices = {"prediction_type": ALPHA_PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._setup_noise_schedule()
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(0, self.config.num_train_timesteps)[::-1].astype(np.int64)
        self.custom_timesteps = False

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        *,
        original_inference_steps: int | None = None,
        timesteps=None,
        strength: float = 1.0,
        sigmas=None,
        mu=None,
    ) -> None:
        self._refuse_schedule_args(sigmas=sigmas, mu=mu)
        config = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{self.name}: pass exactly one of num_inference_steps or timesteps")
        original_steps = (
            original_inference_steps if original_inference_steps is not None else config.original_inference_steps
        )
        if original_steps > config.num_train_timesteps:
            raise ValueError(
                f"{self.name}: original_inference_steps={original_steps} cannot be larger than "
                f"num_train_timesteps={config.num_train_timesteps}"
            )
        # The distillation schedule: every k-th training timestep, k = T // original_steps.
        k = config.num_train_timesteps // original_steps
        lcm_origin_timesteps = np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1

        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(later >= earlier for earlier, later in zip(timesteps, timesteps[1:], strict=False)):
                raise ValueError(f"{self.name}: custom timesteps must be in descending order")
            if timesteps[0] >= config.num_train_timesteps:
                raise ValueError(
                    f"{self.name}: timesteps must start below num_train_timesteps={config.num_train_timesteps}"
                )
            timesteps = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            init_timestep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            t_start = max(self.num_inference_steps - init_timestep, 0)
            timesteps = timesteps[t_start * self.order :]
        else:
            if num_inference_steps > config.num_train_timesteps:
                raise ValueError(
                    f"{self.name}: num_inference_steps={num_inference_steps} cannot be larger than "
                    f"num_train_timesteps={config.num_train_timesteps}"
                )
            skipping_step = len(lcm_origin_timesteps) // num_inference_steps
            if skipping_step < 1:
                raise ValueError(
                    f"{self.name}: num_inference_steps={num_inference_steps} is more than "
                    f"original_inference_steps x strength = {int(original_steps * strength)}"
                )
            if num_inference_steps > original_steps:
                raise ValueError(
                    f"{self.name}: num_inference_steps={num_inference_steps} cannot be larger than "
                    f"original_inference_steps={original_steps}"
                )
            self.num_inference_steps = num_inference_steps
            descending = lcm_origin_timesteps[::-1].copy()
            indices = np.floor(np.linspace(0, len(descending), num=num_inference_steps, endpoint=False))
            timesteps = descending[indices.astype(np.int64)]

        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self._step_index = None
        self._begin_index = None

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) of the consistency parameterisation, float32 as in diffusers."""
        scaled_timestep = np.float32(timestep) * np.float32(self.config.timestep_scaling)
        c_skip = np.float32(SIGMA_DATA**2) / (scaled_timestep * scaled_timestep + np.float32(SIGMA_DATA**2))
        c_out = scaled_timestep / np.sqrt(scaled_timestep * scaled_timestep + np.float32(SIGMA_DATA**2))
        return c_skip, c_out

    def final_sample(self, output: SchedulerOutput) -> np.ndarray:
        """LatentConsistencyModelPipeline decodes the last denoised estimate, not the re-noised sample."""
        return output.denoised

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        *,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> SchedulerOutput:
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        config = self.config
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        timestep = int(timestep)

        prev_step_index = self._step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else timestep
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev

        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        x0, _ = x0_and_epsilon(config.prediction_type, model_output, sample, alpha_prod_t, beta_prod_t)
        x0 = clip_or_threshold(x0, config)
        denoised = c_out * x0 + c_skip * sample

        if self._step_index != self.num_inference_steps - 1:
            step_noise = self._noise(model_output.shape, generator, noise)
            prev_sample = np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(beta_prod_t_prev) * step_noise
        else:
            prev_sample = denoised
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), denoised=denoised.astype(out_dtype))
