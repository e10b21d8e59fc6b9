"""Pseudo numerical methods (Liu et al. 2022), diffusers' PNDMScheduler; SD 1.5 ships it with skip_prk_steps.

Runge-Kutta warm-up steps (PRK) then linear multistep (PLMS) steps, with diffusers' exact
timestep bookkeeping: with skip_prk_steps the second timestep repeats, because PLMS
starts with a 2nd-order (Heun-like) step that needs the model at the same timestep twice.
"""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, AlphaProductMixin, Scheduler, SchedulerOutput, as_float32


class PNDMScheduler(AlphaProductMixin, Scheduler):
    name = "PNDMScheduler"
    sampler_name = "PLMS"
    order = 1
    pndm_order = 4
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    choices = {"prediction_type": ("epsilon", "v_prediction"), "timestep_spacing": TIMESTEP_SPACINGS}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._setup_noise_schedule()
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self._reset_history()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None

    def _reset_history(self) -> None:
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets: list[np.ndarray] = []

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu=None) -> None:
        self._refuse_schedule_args(timesteps=timesteps, sigmas=sigmas, mu=mu)
        if num_inference_steps is None:
            raise ValueError(f"{self.name}: pass num_inference_steps")
        config = self.config
        self.num_inference_steps = num_inference_steps
        # PNDM builds its schedule ascending, then reverses it.
        ascending = spaced_ascending(config.timestep_spacing, config.num_train_timesteps, num_inference_steps)
        if config.timestep_spacing == "leading":
            ascending = ascending + config.steps_offset
        if config.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            half_gap = config.num_train_timesteps // num_inference_steps // 2
            prk = np.array(ascending[-self.pndm_order :]).repeat(2) + np.tile(np.array([0, half_gap]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset_history()

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
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample)
        return self.step_plms(model_output, timestep, sample)

    def step_prk(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> SchedulerOutput:
        """One of the four Runge-Kutta stages; every fourth call completes a step."""
        self._require_timesteps()
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        timestep = int(timestep)
        diff_to_prev = 0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])

        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype))

    def step_plms(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> SchedulerOutput:
        """Linear multistep (Adams-Bashforth up to 4th order) on the stored model outputs."""
        self._require_timesteps()
        config = self.config
        if not config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(f"{self.name}: PLMS steps need the Runge-Kutta warm-up steps first")
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        timestep = int(timestep)
        prev_timestep = timestep - config.num_train_timesteps // self.num_inference_steps

        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # The repeated second timestep: finish the Heun-like step from the first sample.
            prev_timestep = timestep
            timestep = timestep + config.num_train_timesteps // self.num_inference_steps

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype))

    def _get_prev_sample(self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray):
        """x_{t-delta} from x_t and epsilon: eq. 9 of the PNDM paper."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            model_output = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample
        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        denominator = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denominator


def spaced_ascending(spacing: str, num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """PNDM's own ascending schedule (its linspace is rounded, its leading stays float until the end)."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps).round().astype(np.int64)
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_steps
        return (np.arange(0, num_steps) * step_ratio).round()
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_steps
        return np.round(np.arange(num_train_timesteps, 0, -step_ratio))[::-1].astype(np.int64) - 1
    raise ValueError(f"unsupported timestep_spacing={spacing!r}")
