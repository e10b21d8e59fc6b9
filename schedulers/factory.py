"""Picking a scheduler class from a diffusers config's `_class_name`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .base import Scheduler
from .config import load_config
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        PNDMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        LCMScheduler,
        FlowMatchEulerDiscreteScheduler,
    )
}


def from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> Scheduler:
    """The scheduler named by the config's `_class_name`, built from the config plus `overrides`.

    `_class_name` may itself be overridden (`from_config(cfg, _class_name="EulerDiscreteScheduler")`)
    to run a checkpoint's config with another sampler, as diffusers' `X.from_config(cfg)` does.
    """
    loaded = load_config(config)
    class_name = overrides.pop("_class_name", loaded.get("_class_name"))
    if class_name is None:
        raise ValueError("scheduler config has no _class_name; call a scheduler class's from_config instead")
    if class_name not in SCHEDULERS:
        raise ValueError(
            f"unsupported scheduler _class_name={class_name!r} (supported: {', '.join(sorted(SCHEDULERS))})"
        )
    return SCHEDULERS[class_name].from_config(loaded, **overrides)
