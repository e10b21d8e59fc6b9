"""The training noise schedule: betas and their cumulative alpha products.

diffusers builds these with float32 torch ops; each step here reproduces the float32
rounding of the matching torch op, so alphas_cumprod agrees to the last bit.
"""

from __future__ import annotations

import math

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace rounded as torch's CPU kernel does it.

    torch fills the first half forwards from `start` and the second half backwards from `end`,
    each value one fused multiply-add (a single rounding); float64 holds the float32 product
    exactly, so computing in float64 and rounding once gives the same bits.
    """
    if steps == 1:
        return np.array([start], dtype=np.float32)
    first, last = np.float32(start), np.float32(end)
    step = np.float32((last - first) / np.float32(steps - 1))
    index = np.arange(steps)
    halfway = steps // 2
    distance = np.where(index < halfway, index, steps - 1 - index).astype(np.float64)
    from_start = np.float64(first) + np.float64(step) * distance
    from_end = np.float64(last) - np.float64(step) * distance
    return np.where(index < halfway, from_start, from_end).astype(np.float32)


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _alpha_bar_exp(t: float) -> float:
    return math.exp(t * -12.0)


def betas_for_alpha_bar(num_steps: int, alpha_bar=_alpha_bar_cosine, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t) into betas (computed in Python floats, stored float32)."""
    betas = []
    for i in range(num_steps):
        t1, t2 = i / num_steps, (i + 1) / num_steps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float32)


def make_betas(
    scheduler: str,
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas=None,
    extra_schedules: tuple[str, ...] = (),
) -> np.ndarray:
    """float32 betas for `beta_schedule`; `extra_schedules` opts a class into "exp" (Heun)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        root = torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule == "exp" and "exp" in extra_schedules:
        return betas_for_alpha_bar(num_train_timesteps, alpha_bar=_alpha_bar_exp)
    supported = ", ".join(BETA_SCHEDULES + extra_schedules)
    raise ValueError(f"{scheduler}: unsupported beta_schedule={beta_schedule!r} (supported: {supported})")


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """torch.cumprod on CPU accumulates float32 in double and rounds each partial product."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (arXiv 2305.08891, Alg. 1)."""
    alphas_bar_sqrt = np.sqrt(cumprod_f32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod_for(betas: np.ndarray) -> np.ndarray:
    return cumprod_f32(np.float32(1.0) - betas)
