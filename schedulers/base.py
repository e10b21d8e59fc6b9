"""What every scheduler shares: config resolution, validation, step bookkeeping and noise."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .betas import alphas_cumprod_for, make_betas, rescale_zero_terminal_snr
from .config import SchedulerConfig, load_config

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class SchedulerOutput:
    """What `step` returns; the fields diffusers' output classes have, unused ones left None."""

    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None
    denoised: np.ndarray | None = None


class Scheduler:
    """Base of the numpy schedulers; subclasses mirror one diffusers class each.

    Subclasses declare `defaults` (diffusers' constructor defaults: also the set of options
    read from a config), `choices` (allowed values of enumerated options) and
    `fixed` (options stepwise only supports at one value, with the reason).
    """

    name: ClassVar[str] = "Scheduler"
    #: img2img's strength goes into set_timesteps (LCM builds a lower-starting schedule) instead of the
    #: pipeline starting part-way through the full one
    strength_in_schedule: ClassVar[bool] = False
    #: the sampler's name in AUTOMATIC1111's convention, which PNG readers (A1111, ComfyUI, Civitai) show
    sampler_name: ClassVar[str] = "Scheduler"
    order: ClassVar[int] = 1
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    fixed: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.name}: unknown option(s) {', '.join(unknown)}")
        resolved = {**self.defaults, **options}
        # Copy list values (UniPC's disable_corrector) so no two schedulers share one.
        self.config = SchedulerConfig({k: list(v) if isinstance(v, list) else v for k, v in resolved.items()})
        self._validate()
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike | None = None, **overrides: Any):
        """Build from a diffusers config; keys this class does not take are ignored, as diffusers does.

        `_class_name` is ignored here (diffusers lets any compatible config seed any scheduler);
        `schedulers.from_config` is the one that picks the class from it.
        """
        loaded = load_config(config)
        options = {key: value for key, value in loaded.items() if key in cls.defaults}
        return cls(**{**options, **overrides})

    # -- validation -------------------------------------------------------------------------

    def _validate(self) -> None:
        for option, allowed in self.choices.items():
            value = self.config[option]
            if value not in allowed:
                raise ValueError(
                    f"{self.name}: unsupported {option}={value!r} (supported: {', '.join(map(repr, allowed))})"
                )
        for option, (expected, reason) in self.fixed.items():
            if self.config[option] != expected:
                raise ValueError(
                    f"{self.name}: {option}={self.config[option]!r} is not supported by stepwise ({reason})"
                )

    def _reject(self, option: str, value: Any, reason: str) -> None:
        raise ValueError(f"{self.name}: unsupported {option}={value!r} ({reason})")

    def _refuse_schedule_args(self, **given: Any) -> None:
        """Every set_timesteps takes timesteps/sigmas/mu keywords; a class refuses those it has no use for."""
        for argument, value in given.items():
            if value is not None:
                raise ValueError(
                    f"{self.name}.set_timesteps does not take {argument} (diffusers' class has no such input)"
                )

    # -- the training noise schedule --------------------------------------------------------

    def _setup_noise_schedule(self, extra_schedules: tuple[str, ...] = (), pin_terminal: bool = False) -> None:
        """betas → alphas → alphas_cumprod (float32), honouring rescale_betas_zero_snr.

        `pin_terminal`: the sigma-based schedulers set the last alpha_bar to 2^-24 after a
        zero-SNR rescale so the last sigma stays finite.
        """
        config = self.config
        betas = make_betas(
            self.name,
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            extra_schedules,
        )
        if config.get("rescale_betas_zero_snr"):
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = (np.float32(1.0) - betas).astype(np.float32)
        self.alphas_cumprod = alphas_cumprod_for(betas)
        if pin_terminal and config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = np.float32(2.0**-24)

    # -- step bookkeeping (diffusers' step_index / begin_index) -------------------------------

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of `timestep` in the schedule; the second match when it repeats, as diffusers
        does, so a schedule started mid-way (img2img) does not skip a sigma."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        matches = np.flatnonzero(schedule == timestep)
        if len(matches) == 0:
            raise ValueError(f"{self.name}: timestep {timestep!r} is not in the schedule")
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """Schedule positions for add_noise/scale_noise, chosen as diffusers chooses them: by timestep
        before a begin index is set, else the current step (inside the loop) or the begin index."""
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.shape[0]

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{self.name}: call set_timesteps before step")

    # -- noise ------------------------------------------------------------------------------

    def _noise(self, shape, generator: np.random.Generator | None, noise: np.ndarray | None) -> np.ndarray:
        """float32 standard normal noise: the given array, else drawn from `generator`."""
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != tuple(shape):
                raise ValueError(f"{self.name}: noise has shape {noise.shape}, expected {tuple(shape)}")
            return noise
        if generator is None:
            generator = np.random.default_rng()
        if not isinstance(generator, np.random.Generator):
            raise TypeError(f"{self.name}: generator must be a numpy.random.Generator")
        return generator.standard_normal(tuple(shape), dtype=np.float32)

    @property
    def flow(self) -> bool:
        """A flow-matching sampler (the model predicts velocity along a straight path): FlowMatch classes, and
        UniPC/DPM-Solver configured with flow sigmas. A model and its sampler must agree on this."""
        return bool(self.config.get("use_flow_sigmas")) or self.config.get("prediction_type") == "flow_prediction"

    def noise_sample(self, sample: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """The forward process at one schedule timestep, as image-to-image pipelines start: ``add_noise``
        (flow-matching schedulers override this with their ``scale_noise``)."""
        return self.add_noise(sample, noise, np.atleast_1d(np.asarray(timestep)))

    def final_sample(self, output: SchedulerOutput) -> np.ndarray:
        """What a pipeline decodes after the last step: the last ``prev_sample`` (LCM overrides this)."""
        return output.prev_sample

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        return f"{self.name}({options})"


def as_float32(array) -> np.ndarray:
    """Work in float32, as diffusers does for float32 latents."""
    return np.asarray(array, dtype=np.float32)


def broadcast_per_sample(values: np.ndarray, ndim: int) -> np.ndarray:
    """(batch,) → (batch, 1, 1, ...) so per-sample scalars broadcast over a sample of `ndim` dims."""
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * (ndim - 1))


class AlphaProductMixin:
    """add_noise / get_velocity for the schedulers indexed by training timestep (DDPM, DDIM, PNDM, LCM)."""

    alphas_cumprod: np.ndarray

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward diffusion q(x_t | x_0): sqrt(alpha_bar)·x0 + sqrt(1 - alpha_bar)·noise."""
        original_samples = np.asarray(original_samples)
        dtype = original_samples.dtype
        alphas_cumprod = self.alphas_cumprod.astype(dtype)[np.asarray(timesteps, dtype=np.int64)]
        sqrt_alpha_prod = broadcast_per_sample(np.sqrt(alphas_cumprod), original_samples.ndim)
        sqrt_one_minus = broadcast_per_sample(np.sqrt(1 - alphas_cumprod), original_samples.ndim)
        return (sqrt_alpha_prod * original_samples + sqrt_one_minus * np.asarray(noise, dtype=dtype)).astype(dtype)

    def get_velocity(self, sample: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """The v-prediction target: sqrt(alpha_bar)·noise - sqrt(1 - alpha_bar)·x0."""
        sample = np.asarray(sample)
        dtype = sample.dtype
        alphas_cumprod = self.alphas_cumprod.astype(dtype)[np.asarray(timesteps, dtype=np.int64)]
        sqrt_alpha_prod = broadcast_per_sample(np.sqrt(alphas_cumprod), sample.ndim)
        sqrt_one_minus = broadcast_per_sample(np.sqrt(1 - alphas_cumprod), sample.ndim)
        return (sqrt_alpha_prod * np.asarray(noise, dtype=dtype) - sqrt_one_minus * sample).astype(dtype)
