"""UniPC: unified predictor-corrector (Zhao et al. 2023), diffusers' UniPCMultistepScheduler.

Each step first corrects the previous step's result with the new model output (UniC),
then predicts the next sample (UniP). The flow variant (use_flow_sigmas, flow_prediction)
is what HiDream ships.
"""

from __future__ import annotations

import numpy as np

from .base import TIMESTEP_SPACINGS, SchedulerOutput, as_float32
from .flow_shift import static_shift, stretch_shift_to_terminal, time_shift
from .multistep import MultistepScheduler
from .sigmas import interp_sigmas, sigmas_to_timesteps
from .spacing import solver_timesteps

SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


class UniPCMultistepScheduler(MultistepScheduler):
    name = "UniPCMultistepScheduler"
    sampler_name = "UniPC"
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
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }
    choices = {
        "prediction_type": ("epsilon", "sample", "v_prediction", "flow_prediction"),
        "solver_type": ("bh1", "bh2") + tuple(SOLVER_TYPE_ALIASES),
        "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": TIMESTEP_SPACINGS,
        "time_shift_type": ("exponential", "linear"),
    }
    fixed = {
        "use_beta_sigmas": (False, "beta sigmas need scipy's beta.ppf"),
        "solver_p": (None, "an external predictor scheduler is not supported"),
    }

    def __init__(self, **options) -> None:
        config = {**self.defaults, **options}
        config["solver_type"] = SOLVER_TYPE_ALIASES.get(config["solver_type"], config["solver_type"])
        super().__init__(**config)
        config = self.config
        if not isinstance(config.solver_order, int) or config.solver_order < 1:
            self._reject("solver_order", config.solver_order, "a positive integer")
        if config.use_karras_sigmas and config.use_exponential_sigmas:
            raise ValueError(f"{self.name}: use only one of use_karras_sigmas and use_exponential_sigmas")
        if config.shift_terminal is not None and not config.use_flow_sigmas:
            raise ValueError(f"{self.name}: shift_terminal is only supported with use_flow_sigmas=True")
        if config.prediction_type == "flow_prediction" and not config.predict_x0:
            self._reject("prediction_type", "flow_prediction", "needs predict_x0=True")
        if config.final_sigmas_type == "zero" and (config.solver_type == "bh1" or not config.predict_x0):
            # Their last step multiplies an infinite phi-term by zero: diffusers returns NaN there.
            self._reject(
                "final_sigmas_type",
                "zero",
                "with solver_type='bh1' or predict_x0=False the last step is NaN in diffusers; use 'sigma_min'",
            )
        self._setup_multistep()
        self.predict_x0 = config.predict_x0
        self.disable_corrector = list(config.disable_corrector)
        self.timestep_list = [None] * config.solver_order
        self.last_sample = None
        self.this_order = 1

    def set_timesteps(
        self, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None, mu: float | None = None
    ) -> None:
        """`mu` is only read with use_dynamic_shifting (ignored otherwise, as diffusers does)."""
        self._refuse_schedule_args(timesteps=timesteps)
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError(f"{self.name}: mu must be passed when use_dynamic_shifting=True")
        if sigmas is not None:
            if not config.use_flow_sigmas:
                raise ValueError(f"{self.name}: explicit sigmas are only supported with use_flow_sigmas=True")
            sigmas = np.array(sigmas)
            num_inference_steps = len(sigmas)
        if num_inference_steps is None:
            raise ValueError(f"{self.name}: pass num_inference_steps or sigmas")

        timesteps = solver_timesteps(
            config.timestep_spacing, config.num_train_timesteps, num_inference_steps, config.num_train_timesteps
        ).astype(np.int64)
        if config.timestep_spacing == "leading":
            timesteps += config.steps_offset

        final_is_min = config.final_sigmas_type == "sigma_min"
        training = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        if config.use_karras_sigmas or config.use_exponential_sigmas:
            if sigmas is None:
                sigmas = training
            log_sigmas = np.log(sigmas)
            descending = np.flip(sigmas).copy()
            if config.use_karras_sigmas:
                sigmas = self._convert_sigmas("karras", descending, num_inference_steps)
                if config.use_flow_sigmas:
                    sigmas = sigmas / (sigmas + 1)
                    timesteps = (sigmas * config.num_train_timesteps).copy()
                else:
                    timesteps = sigmas_to_timesteps(sigmas, log_sigmas).round()
            else:
                sigmas = self._convert_sigmas("exponential", descending, num_inference_steps)
                timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
            sigma_last = sigmas[-1] if final_is_min else 0
        elif config.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / config.num_train_timesteps, num_inference_steps + 1)[:-1]
            if config.use_dynamic_shifting:
                sigmas = time_shift(config.time_shift_type, mu, sigmas)
            else:
                sigmas = static_shift(config.flow_shift, sigmas)
            if config.shift_terminal:
                sigmas = stretch_shift_to_terminal(sigmas, config.shift_terminal)
            # Keep sigma just below 1 so alpha_t = 1 - sigma (and its log) stays finite.
            eps = 1e-06
            if np.fabs(sigmas[0] - 1) < eps:
                sigmas[0] -= eps
            timesteps = (sigmas * config.num_train_timesteps).copy()
            sigma_last = sigmas[-1] if final_is_min else 0
        else:
            if sigmas is None:
                sigmas = training
            sigmas = interp_sigmas(timesteps, sigmas)
            sigma_last = training[0] if final_is_min else 0

        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * config.solver_order
        self.timestep_list = [None] * config.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self._step_index = None
        self._begin_index = None

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x0 prediction (predict_x0, the default) or noise prediction, from any prediction type."""
        config = self.config
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        if self.predict_x0:
            if config.prediction_type == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif config.prediction_type == "sample":
                x0 = model_output
            elif config.prediction_type == "v_prediction":
                x0 = alpha_t * sample - sigma_t * model_output
            else:  # flow_prediction: the model predicts noise - x0
                x0 = sample - sigma * model_output
            return self._threshold(x0) if config.thresholding else x0
        if config.prediction_type == "epsilon":
            return model_output
        if config.prediction_type == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample  # v_prediction

    def _coefficients(self, h, order: int):
        """phi_1(hh), the B(h) normaliser and the b vector of the UniPC linear system."""
        hh = -h if self.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        b_h = hh if self.config.solver_type == "bh1" else np.expm1(hh)
        b = []
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return h_phi_1, b_h, np.array(b, dtype=np.float32)

    def _differences(self, anchor_index: int, lambda_s0, h, order: int, m0):
        """Ratios r_k and scaled differences D1_k of the older model outputs against m0."""
        rks, d1s = [], []
        for k in range(1, order):
            _, _, lambda_si = self._lambda(self.sigmas[anchor_index - k])
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(np.float32(1.0))
        return np.array(rks, dtype=np.float32), d1s

    @staticmethod
    def _power_matrix(rks: np.ndarray, order: int) -> np.ndarray:
        return np.stack([rks**k if k else np.ones_like(rks) for k in range(order)])

    @staticmethod
    def _weighted_sum(weights, terms):
        return sum(weight * term for weight, term in zip(weights, terms, strict=True))

    def multistep_uni_p_bh_update(self, sample: np.ndarray, order: int) -> np.ndarray:
        """UniP: predict x at the next sigma from the stored model outputs."""
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i])
        h = lambda_t - lambda_s0
        rks, d1s = self._differences(i, lambda_s0, h, order, m0)
        h_phi_1, b_h, b = self._coefficients(h, order)
        pred_res = 0
        if d1s:
            if order == 2:
                rhos_p = np.array([0.5], dtype=np.float32)
            else:
                matrix = self._power_matrix(rks, order)
                rhos_p = np.linalg.solve(matrix[:-1, :-1], b[:-1]).astype(np.float32)
            pred_res = self._weighted_sum(rhos_p, d1s)
        if self.predict_x0:
            x_t_ = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
            return x_t_ - alpha_t * b_h * pred_res
        x_t_ = alpha_t / alpha_s0 * sample - sigma_t * h_phi_1 * m0
        return x_t_ - sigma_t * b_h * pred_res

    def multistep_uni_c_bh_update(self, this_model_output, last_sample, this_sample, order: int) -> np.ndarray:
        """UniC: correct the previous prediction now that the model has been evaluated there."""
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i])
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i - 1])
        h = lambda_t - lambda_s0
        rks, d1s = self._differences(i - 1, lambda_s0, h, order, m0)
        h_phi_1, b_h, b = self._coefficients(h, order)
        if order == 1:
            rhos_c = np.array([0.5], dtype=np.float32)
        else:
            rhos_c = np.linalg.solve(self._power_matrix(rks, order), b).astype(np.float32)
        corr_res = self._weighted_sum(rhos_c[:-1], d1s) if d1s else 0
        d1_t = this_model_output - m0
        if self.predict_x0:
            x_t_ = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
            return x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * d1_t)
        x_t_ = alpha_t / alpha_s0 * last_sample - sigma_t * h_phi_1 * m0
        return x_t_ - sigma_t * b_h * (corr_res + rhos_c[-1] * d1_t)

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
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        config = self.config
        out_dtype = np.asarray(sample).dtype
        model_output, sample = as_float32(model_output), as_float32(sample)
        i = self._step_index

        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        converted = self.convert_model_output(model_output, sample)
        with np.errstate(divide="ignore", invalid="ignore"):
            if use_corrector:
                sample = self.multistep_uni_c_bh_update(converted, self.last_sample, sample, self.this_order)

            self._push_model_output(converted)
            self.timestep_list = self.timestep_list[1:] + [timestep]

            this_order = config.solver_order
            if config.lower_order_final:
                this_order = min(config.solver_order, len(self.timesteps) - i)
            self.this_order = min(this_order, self.lower_order_nums + 1)
            self.last_sample = sample
            prev_sample = self.multistep_uni_p_bh_update(sample, self.this_order)

        if self.lower_order_nums < config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype))
