"""The one denoising loop, as a function over a schedule (in the spirit of k-diffusion's ``sample_*``).

``denoise(x, t)`` is the model wrapped as a denoiser: it takes the scheduler's scaled input and the timestep
and returns the prediction the scheduler steps with (guidance already applied). Everything that watches the
loop — the progress bar, the per-step profile, a caller that wants to stop early — is a ``callback`` that
gets a :class:`Step` after each step; returning ``False`` stops the run there (diffusers'
``callback_on_step_end`` with ``pipe._interrupt``). ``after_step`` may replace the latents after each
step (inpainting's blend with the re-noised image), as diffusers' inpaint pipelines do inside their loop.

``steps()`` is the loop as an iterator, so a benchmark can advance several loops in turn (one step of each
engine per round) with exactly this code; ``sample()`` drains it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

Denoise = Callable[[np.ndarray, object], np.ndarray]


@dataclass
class Step:
    """What a callback sees after step ``index`` of ``total``."""

    index: int
    total: int
    timestep: float
    sigma: float | None
    latents: np.ndarray  # the latents after this step (the scheduler's layout, e.g. FLUX packed)
    denoised: np.ndarray | None  # the scheduler's estimate of the clean sample, where it has one
    denoiser_ms: float
    scheduler_ms: float


@dataclass
class Sampled:
    latents: np.ndarray  # what the decoder should decode (LCM: the last denoised estimate)
    steps_run: int
    stopped: bool  # a callback stopped the run early


def schedule_start(scheduler, steps: int, run: int) -> int:
    """Where image-to-image starts in the schedule to run its last ``run`` steps (registry.policy.steps_run
    counts them as the family's ``get_timesteps`` does); the scheduler's begin index is set there."""
    start = max(steps - run, 0) * scheduler.order
    scheduler.set_begin_index(start)
    return start


def steps(
    denoise: Denoise,
    scheduler,
    x: np.ndarray,
    *,
    start: int = 0,
    rng: np.random.Generator | None = None,
    after_step: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[Step, object]]:
    """Yield ``(Step, scheduler output)`` after each step of ``scheduler.timesteps[start:]``."""
    timesteps = scheduler.timesteps[start:]
    sigmas = getattr(scheduler, "sigmas", None)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        t0 = time.perf_counter()
        output = denoise(scheduler.scale_model_input(x, t), t)
        t1 = time.perf_counter()
        result = scheduler.step(output, t, x, generator=rng)
        x = result.prev_sample
        if after_step is not None:  # the blended latents are the step's output from here on
            x = after_step(i, x)
            result = dataclasses.replace(result, prev_sample=x)
        t2 = time.perf_counter()
        k = start + i
        sigma = float(sigmas[k]) if sigmas is not None and k < len(sigmas) else None
        step = Step(i, total, float(t), sigma, x, result.denoised, (t1 - t0) * 1000, (t2 - t1) * 1000)
        yield step, result


def sample(
    denoise: Denoise,
    scheduler,
    x: np.ndarray,
    *,
    start: int = 0,
    rng: np.random.Generator | None = None,
    callback: Callable[[Step], bool | None] | None = None,
    after_step: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Sampled:
    """Run the schedule from ``start``; what is decoded at the end is asked of the scheduler."""
    last, done, stopped = None, 0, False
    for step, output in steps(denoise, scheduler, x, start=start, rng=rng, after_step=after_step):
        x, done, last = step.latents, step.index + 1, output
        if callback is not None and callback(step) is False:
            stopped = True
            break
    final = scheduler.final_sample(last) if last is not None and not stopped else x
    return Sampled(final, done, stopped)


def callbacks(*functions: Callable[[Step], bool | None] | None) -> Callable[[Step], bool | None]:
    """Several callbacks as one; the run stops when any of them returns False."""
    chosen = [f for f in functions if f is not None]

    def call(step: Step) -> bool:
        return all([f(step) is not False for f in chosen])  # a list: every callback sees every step

    return call
