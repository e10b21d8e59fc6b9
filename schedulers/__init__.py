"""Hand-written numpy samplers with diffusers' scheduler interface and numbers (no torch, no diffusers).

    scheduler = schedulers.from_config(model_scheduler_config)
    scheduler.set_timesteps(steps)                       # FLUX-style: set_timesteps(steps, sigmas=..., mu=...)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(model(model_input, t), t, latents).prev_sample

See docs/schedulers.md for the supported classes and options.
"""

from .base import Scheduler, SchedulerOutput
from .config import SchedulerConfig, load_config
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .factory import SCHEDULERS, from_config
from .flow_match import FlowMatchEulerDiscreteScheduler
from .flow_shift import calculate_shift
from .guidance import guidance_scale_embedding
from .heun import HeunDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "UniPCMultistepScheduler",
    "calculate_shift",
    "from_config",
    "guidance_scale_embedding",
    "load_config",
]
