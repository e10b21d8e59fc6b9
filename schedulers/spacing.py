"""Which training timesteps an N-step schedule visits (Table 2 of arXiv 2305.08891).

All functions return float64 values, descending, exactly as diffusers' numpy code produces
them before each scheduler casts (int64 or float32) and adds `steps_offset`.
"""

from __future__ import annotations

import numpy as np


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """The DDPM/DDIM/Euler family: `num_steps` timesteps, first one the noisiest.

    linspace: evenly from T-1 down to 0, not rounded (integer schedulers round).
    leading:  multiples of T // N (callers add steps_offset).
    trailing: evenly from T down, rounded, minus one, so the first step is T-1.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_steps
        return (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.float64)
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_steps
        return np.round(np.arange(num_train_timesteps, 0, -step_ratio)) - 1
    raise ValueError(f"unsupported timestep_spacing={spacing!r}")


def solver_timesteps(spacing: str, num_train_timesteps: int, num_steps: int, last_timestep: int) -> np.ndarray:
    """The multistep solvers' variant (DPM-Solver, UniPC): N+1 points with the last dropped.

    `last_timestep` is where the schedule starts (T unless lambda_min_clipped cuts it).
    """
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        step_ratio = last_timestep // (num_steps + 1)
        return (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1].astype(np.float64)
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_steps
        return np.arange(last_timestep, 0, -step_ratio).round() - 1
    raise ValueError(f"unsupported timestep_spacing={spacing!r}")
