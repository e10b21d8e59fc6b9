"""Euler steps on a rectified-flow ODE, diffusers' FlowMatchEulerDiscreteScheduler (SD3, FLUX, Qwen-Image).

x_sigma = (1 - sigma)·x0 + sigma·noise and the model predicts the velocity noise - x0, so one
step is x += (sigma_next - sigma)·v. Shifting the sigmas (static, or by mu from the image size)
spends more steps at high noise for larger images.
"""

from __future__ import annotations

import numpy as np

from .base import Scheduler, SchedulerOutput, as_float32, broadcast_per_sample
from .flow_shift import static_shift, stretch_shift_to_terminal, time_shift
from .sigmas import exponential_sigmas, karras_sigmas


class FlowMatchEulerDiscreteScheduler(Scheduler):
    name = "FlowMatchEulerDiscreteScheduler"
    sampler_name = "Euler (flow)"
    order = 1
    defaults = {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }
    choices = {"time_shift_type": ("exponential", "linear")}
    fixed = {"use_beta_sigmas": (False, "beta sigmas need scipy's beta.ppf")}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        config = self.config
        if config.use_karras_sigmas and config.use_exponential_sigmas:
            raise ValueError(f"{self.name}: use only one of use_karras_sigmas and use_exponential_sigmas")
        num_train_timesteps = config.num_train_timesteps
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = timesteps / np.float32(num_train_timesteps)
        if not config.use_dynamic_shifting:
            sigmas = static_shift(config.shift, sigmas).astype(np.float32)
        self.timesteps = sigmas * np.float32(num_train_timesteps)
        self.sigmas = sigmas
        self._shift = config.shift
        # The extreme training sigmas bound every inference schedule.
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.init_noise_sigma = 1.0

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        *,
        sigmas=None,
        mu: float | None = None,
        timesteps=None,
    ) -> None:
        """`mu` is only read with use_dynamic_shifting (ignored otherwise, as diffusers does)."""
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError(f"{self.name}: mu must be passed when use_dynamic_shifting=True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"{self.name}: sigmas and timesteps must have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                timesteps is not None and len(timesteps) != num_inference_steps
            ):
                raise ValueError(f"{self.name}: sigmas/timesteps must have num_inference_steps entries")
        elif sigmas is None and timesteps is None:
            raise ValueError(f"{self.name}: pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.num_inference_steps = num_inference_steps

        timesteps_given = timesteps is not None
        if timesteps_given:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                num_train = config.num_train_timesteps
                timesteps = np.linspace(self.sigma_max * num_train, self.sigma_min * num_train, num_inference_steps)
            sigmas = timesteps / config.num_train_timesteps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)

        if config.use_dynamic_shifting:
            sigmas = time_shift(config.time_shift_type, mu, sigmas)
        else:
            sigmas = static_shift(self.shift, sigmas)
        if config.shift_terminal:
            sigmas = stretch_shift_to_terminal(sigmas, config.shift_terminal)
        if config.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
        elif config.use_exponential_sigmas:
            sigmas = exponential_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)

        sigmas = np.asarray(sigmas).astype(np.float32)
        if not timesteps_given:
            timesteps = sigmas * np.float32(config.num_train_timesteps)
        if config.invert_sigmas:
            sigmas = np.float32(1.0) - sigmas
            timesteps = sigmas * np.float32(config.num_train_timesteps)
            sigmas = np.concatenate([sigmas, np.ones(1, dtype=np.float32)])
        else:
            sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.timesteps = np.asarray(timesteps).astype(np.float32)
        self.sigmas = sigmas
        self._step_index = None
        self._begin_index = None

    def scale_noise(self, sample: np.ndarray, timestep, noise: np.ndarray) -> np.ndarray:
        """Forward process for img2img: sigma·noise + (1 - sigma)·sample at the given timestep(s)."""
        sample = np.asarray(sample)
        dtype = sample.dtype
        sigmas = self.sigmas.astype(dtype)
        timestep = np.atleast_1d(np.asarray(timestep))
        indices = self._noise_indices(timestep)
        sigma = broadcast_per_sample(sigmas[indices], sample.ndim)
        return (sigma * np.asarray(noise, dtype=dtype) + (1.0 - sigma) * sample).astype(dtype)

    @property
    def flow(self) -> bool:
        return True

    def noise_sample(self, sample: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        return self.scale_noise(sample, timestep, noise)

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        *,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> SchedulerOutput:
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            raise ValueError(f"{self.name}.step takes one of scheduler.timesteps (a float), not an integer index")
        if self._step_index is None:
            self._init_step_index(timestep)
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)

        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        if self.config.stochastic_sampling:
            # Jump to the x0 estimate and re-noise to sigma_next with fresh noise.
            x0 = sample - sigma * model_output
            step_noise = self._noise(sample.shape, generator, noise)
            prev_sample = (1.0 - sigma_next) * x0 + sigma_next * step_noise
        else:
            prev_sample = sample + (sigma_next - sigma) * model_output
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype))
