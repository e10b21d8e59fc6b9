"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler.

"DPM++ 2M" is algorithm_type="dpmsolver++", solver_order=2; "DPM++ 2M Karras" adds use_karras_sigmas;
the SDE variants add fresh noise every step.
"""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, SchedulerOutput, as_float32
from .multistep import MultistepScheduler
from .sigmas import interp_sigmas, lu_lambdas, sigmas_to_timesteps
from .spacing import solver_timesteps

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
# diffusers accepts other solvers' names and maps them onto its own.
ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


class DPMSolverMultistepScheduler(MultistepScheduler):
    name = "DPMSolverMultistepScheduler"
    sampler_name = "DPM++ 2M"
    order = 1
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    choices = {
        "solver_order": (1, 2, 3),
        "prediction_type": ("epsilon", "sample", "v_prediction", "flow_prediction"),
        "algorithm_type": ALGORITHM_TYPES + tuple(ALGORITHM_ALIASES),
        "solver_type": ("midpoint", "heun") + tuple(SOLVER_TYPE_ALIASES),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None, "learned", "learned_range"),
        "timestep_spacing": TIMESTEP_SPACINGS,
        "time_shift_type": ("exponential",),
    }
    fixed = {"use_beta_sigmas": (False, "beta sigmas need scipy's beta.ppf")}

    def __init__(self, **options) -> None:
        config = {**self.defaults, **options}
        config["algorithm_type"] = ALGORITHM_ALIASES.get(config["algorithm_type"], config["algorithm_type"])
        config["solver_type"] = SOLVER_TYPE_ALIASES.get(config["solver_type"], config["solver_type"])
        super().__init__(**config)
        config = self.config
        if sum([config.use_karras_sigmas, config.use_exponential_sigmas, config.use_lu_lambdas]) > 1:
            raise ValueError(f"{self.name}: use only one of use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas")
        if config.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and config.final_sigmas_type == "zero":
            raise ValueError(
                f"{self.name}: final_sigmas_type='zero' is not supported for algorithm_type="
                f"{config.algorithm_type!r}; use 'sigma_min'"
            )
        if config.prediction_type == "flow_prediction" and config.algorithm_type not in (
            "dpmsolver++",
            "sde-dpmsolver++",
        ):
            self._reject(
                "prediction_type", "flow_prediction", f"needs algorithm_type dpmsolver++ (got {config.algorithm_type})"
            )
        if config.algorithm_type == "sde-dpmsolver" and config.solver_order == 3:
            # diffusers has no third-order sde-dpmsolver update (its step fails there).
            self._reject("solver_order", 3, "no third-order update for algorithm_type='sde-dpmsolver'")
        self._setup_multistep()
        # diffusers overwrites config.flow_shift with e^mu when set_timesteps gets mu; kept here instead.
        self.flow_shift = config.flow_shift

    def set_timesteps(
        self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu: float | None = None
    ) -> None:
        self._refuse_schedule_args(sigmas=sigmas)
        config = self.config
        if mu is not None:
            if not (config.use_dynamic_shifting and config.time_shift_type == "exponential"):
                raise ValueError(f"{self.name}: mu needs use_dynamic_shifting=True")
            self.flow_shift = float(np.exp(mu))
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{self.name}: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and (
            config.use_karras_sigmas or config.use_lu_lambdas or config.use_exponential_sigmas
        ):
            raise ValueError(f"{self.name}: custom timesteps cannot be combined with karras/lu/exponential sigmas")

        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            # lambda_min_clipped trims the noisiest end of the schedule (for cosine schedules).
            clipped_idx = int(np.searchsorted(self.lambda_t[::-1], config.lambda_min_clipped))
            last_timestep = config.num_train_timesteps - clipped_idx
            timesteps = solver_timesteps(
                config.timestep_spacing, config.num_train_timesteps, num_inference_steps, last_timestep
            )
            timesteps = timesteps.astype(np.int64)
            if config.timestep_spacing == "leading":
                timesteps += config.steps_offset

        training = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        log_sigmas = np.log(training)
        round_timesteps = config.beta_schedule != "squaredcos_cap_v2"
        if config.use_karras_sigmas:
            sigmas = self._convert_sigmas("karras", np.flip(training).copy(), num_inference_steps)
            timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
            if round_timesteps:
                timesteps = timesteps.round()
        elif config.use_lu_lambdas:
            log_sigmas_desc = np.flip(log_sigmas.copy())
            sigmas = np.exp(lu_lambdas(log_sigmas_desc[-1].item(), log_sigmas_desc[0].item(), num_inference_steps))
            timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
            if round_timesteps:
                timesteps = timesteps.round()
        elif config.use_exponential_sigmas:
            sigmas = self._convert_sigmas("exponential", np.flip(training).copy(), num_inference_steps)
            timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
        elif config.use_flow_sigmas:
            alphas = np.linspace(1, 1 / config.num_train_timesteps, num_inference_steps + 1)
            sigmas = 1.0 - alphas
            sigmas = np.flip(self.flow_shift * sigmas / (1 + (self.flow_shift - 1) * sigmas))[:-1].copy()
            timesteps = (sigmas * config.num_train_timesteps).copy()
        else:
            sigmas = interp_sigmas(timesteps, training)

        sigma_last = training[0] if config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        # Truncation toward zero, as torch's .to(int64).
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++ works on the predicted x0; DPM-Solver on the predicted noise."""
        config = self.config
        sigma = self.sigmas[self._step_index]
        if config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if config.prediction_type == "epsilon":
                if config.variance_type in ("learned", "learned_range"):
                    model_output = model_output[:, :3]
                alpha_t, sigma_t = self._alpha_sigma(sigma)
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif config.prediction_type == "sample":
                x0 = model_output
            elif config.prediction_type == "v_prediction":
                alpha_t, sigma_t = self._alpha_sigma(sigma)
                x0 = alpha_t * sample - sigma_t * model_output
            else:  # flow_prediction
                x0 = sample - sigma * model_output
            return self._threshold(x0) if config.thresholding else x0

        if config.prediction_type == "epsilon":
            epsilon = model_output[:, :3] if config.variance_type in ("learned", "learned_range") else model_output
        elif config.prediction_type == "sample":
            alpha_t, sigma_t = self._alpha_sigma(sigma)
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:  # v_prediction
            alpha_t, sigma_t = self._alpha_sigma(sigma)
            epsilon = alpha_t * model_output + sigma_t * sample
        if config.thresholding:
            alpha_t, sigma_t = self._alpha_sigma(sigma)
            x0 = self._threshold((sample - sigma_t * epsilon) / alpha_t)
            epsilon = (sample - alpha_t * x0) / sigma_t
        return epsilon

    def dpm_solver_first_order_update(self, model_output, sample, noise=None) -> np.ndarray:
        """One DDIM-equivalent step (eq. 3.5 of DPM-Solver++)."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = self._lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        algorithm = self.config.algorithm_type
        if algorithm == "dpmsolver++":
            return sigma_t / sigma_s * sample - alpha_t * (np.exp(-h) - 1.0) * model_output
        if algorithm == "dpmsolver":
            return alpha_t / alpha_s * sample - sigma_t * (np.exp(h) - 1.0) * model_output
        if algorithm == "sde-dpmsolver++":
            return (
                sigma_t / sigma_s * np.exp(-h) * sample
                + alpha_t * (1 - np.exp(-2.0 * h)) * model_output
                + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
            )
        return (  # sde-dpmsolver
            alpha_t / alpha_s * sample
            - 2.0 * (sigma_t * (np.exp(h) - 1.0)) * model_output
            + sigma_t * np.sqrt(np.exp(2 * h) - 1.0) * noise
        )

    def multistep_dpm_solver_second_order_update(self, model_outputs, sample, noise=None) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i])
        _, _, lambda_s1 = self._lambda(self.sigmas[i - 1])
        m0, m1 = model_outputs[-1], model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, 1.0 / r0 * (m0 - m1)
        algorithm, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if algorithm == "dpmsolver++":
            if midpoint:
                return (
                    sigma_t / sigma_s0 * sample
                    - alpha_t * (np.exp(-h) - 1.0) * d0
                    - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
                )
            return (
                sigma_t / sigma_s0 * sample
                - alpha_t * (np.exp(-h) - 1.0) * d0
                + alpha_t * ((np.exp(-h) - 1.0) / h + 1.0) * d1
            )
        if algorithm == "dpmsolver":
            if midpoint:
                return (
                    alpha_t / alpha_s0 * sample
                    - sigma_t * (np.exp(h) - 1.0) * d0
                    - 0.5 * (sigma_t * (np.exp(h) - 1.0)) * d1
                )
            return (
                alpha_t / alpha_s0 * sample
                - sigma_t * (np.exp(h) - 1.0) * d0
                - sigma_t * ((np.exp(h) - 1.0) / h - 1.0) * d1
            )
        if algorithm == "sde-dpmsolver++":
            if midpoint:
                return (
                    sigma_t / sigma_s0 * np.exp(-h) * sample
                    + alpha_t * (1 - np.exp(-2.0 * h)) * d0
                    + 0.5 * (alpha_t * (1 - np.exp(-2.0 * h))) * d1
                    + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
                )
            return (
                sigma_t / sigma_s0 * np.exp(-h) * sample
                + alpha_t * (1 - np.exp(-2.0 * h)) * d0
                + alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * d1
                + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
            )
        if midpoint:  # sde-dpmsolver
            return (
                alpha_t / alpha_s0 * sample
                - 2.0 * (sigma_t * (np.exp(h) - 1.0)) * d0
                - sigma_t * (np.exp(h) - 1.0) * d1
                + sigma_t * np.sqrt(np.exp(2 * h) - 1.0) * noise
            )
        return (
            alpha_t / alpha_s0 * sample
            - 2.0 * (sigma_t * (np.exp(h) - 1.0)) * d0
            - 2.0 * (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * d1
            + sigma_t * np.sqrt(np.exp(2 * h) - 1.0) * noise
        )

    def multistep_dpm_solver_third_order_update(self, model_outputs, sample, noise=None) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i])
        _, _, lambda_s1 = self._lambda(self.sigmas[i - 1])
        _, _, lambda_s2 = self._lambda(self.sigmas[i - 2])
        m0, m1, m2 = model_outputs[-1], model_outputs[-2], model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d0 = m0
        d1_0, d1_1 = 1.0 / r0 * (m0 - m1), 1.0 / r1 * (m1 - m2)
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = 1.0 / (r0 + r1) * (d1_0 - d1_1)
        algorithm = self.config.algorithm_type
        if algorithm == "dpmsolver++":
            return (
                sigma_t / sigma_s0 * sample
                - alpha_t * (np.exp(-h) - 1.0) * d0
                + alpha_t * ((np.exp(-h) - 1.0) / h + 1.0) * d1
                - alpha_t * ((np.exp(-h) - 1.0 + h) / (h * h) - 0.5) * d2
            )
        if algorithm == "dpmsolver":
            return (
                alpha_t / alpha_s0 * sample
                - sigma_t * (np.exp(h) - 1.0) * d0
                - sigma_t * ((np.exp(h) - 1.0) / h - 1.0) * d1
                - sigma_t * ((np.exp(h) - 1.0 - h) / (h * h) - 0.5) * d2
            )
        if algorithm == "sde-dpmsolver++":
            return (
                sigma_t / sigma_s0 * np.exp(-h) * sample
                + alpha_t * (1.0 - np.exp(-2.0 * h)) * d0
                + alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * d1
                + alpha_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5) * d2
                + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
            )
        raise AssertionError("unreachable: __init__ rejects solver_order=3 for sde-dpmsolver")

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
        num_steps = len(self.timesteps)
        i = self._step_index

        # Drop to lower orders at the end: stabler for few steps, and needed when the last sigma is 0.
        lower_order_final = i == num_steps - 1 and (
            config.euler_at_final or (config.lower_order_final and num_steps < 15) or config.final_sigmas_type == "zero"
        )
        lower_order_second = i == num_steps - 2 and config.lower_order_final and num_steps < 15

        model_output = self.convert_model_output(model_output, sample)
        self._push_model_output(model_output)

        step_noise = None
        if config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            step_noise = self._noise(model_output.shape, generator, noise)

        with np.errstate(divide="ignore", invalid="ignore"):
            if config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self.dpm_solver_first_order_update(model_output, sample, step_noise)
            elif config.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample, step_noise)
            else:
                prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample, step_noise)

        if self.lower_order_nums < config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype))
