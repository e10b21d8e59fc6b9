"""AUTOMATIC1111's sampler names mapped to Stepwise's schedulers (docs/schedulers.md).

A1111 names a sampler ("DPM++ 2M") and, since 1.9, its sigma schedule separately (``scheduler``: "Karras");
older clients put the schedule in the name ("DPM++ 2M Karras"). Both are read. A diffusers class name works
too, as the CLI's ``--scheduler``. On a flow-matching model (SD 3, FLUX, Qwen-Image) the Euler names mean
its own flow-matching Euler: the only sampler of that kind A1111's names cover.
"""

from __future__ import annotations

import schedulers
from registry.policy import InputError

# name → (diffusers class, config options, A1111's aliases)
SAMPLERS: dict[str, tuple[str, dict, list[str]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("EulerDiscreteScheduler", {}, ["k_euler"]),
    "Heun": ("HeunDiscreteScheduler", {}, ["k_heun"]),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}, ["k_dpmpp_2m"]),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, ["k_dpmpp_2m_ka"]),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, ["k_euler_ka"]),
    "DDIM": ("DDIMScheduler", {}, ["ddim"]),
    "PLMS": ("PNDMScheduler", {}, ["plms"]),
    "UniPC": ("UniPCMultistepScheduler", {}, ["unipc"]),
    "LCM": ("LCMScheduler", {}, ["k_lcm"]),
    "DDPM": ("DDPMScheduler", {}, ["ddpm"]),
    "Euler (flow)": ("FlowMatchEulerDiscreteScheduler", {}, ["flow_euler"]),
}
# A1111 1.9's separate schedule names; "automatic"/"uniform" keep the sampler's own
SCHEDULES = {
    "automatic": {},
    "uniform": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
}
DEFAULTS = {"", "default", "automatic"}
FLOW_EULER = {"euler", "euler a", "euler (flow)", "k_euler", "k_euler_a", "k_euler_ancestral", "flow_euler"}


def listing() -> list[dict]:
    """``GET /sdapi/v1/samplers``."""
    return [{"name": name, "aliases": aliases, "options": {}} for name, (_, _, aliases) in SAMPLERS.items()]


def schedules() -> list[dict]:
    """``GET /sdapi/v1/schedulers``."""
    return [{"name": name, "label": name.title(), "aliases": None} for name in SCHEDULES]


def _lookup(name: str) -> tuple[str, dict] | None:
    key = name.strip().lower()
    for sampler, (cls, options, aliases) in SAMPLERS.items():
        if key == sampler.lower() or key in aliases:
            return cls, dict(options)
    if name in schedulers.SCHEDULERS:
        return name, {}
    return None


def scheduler_for(sampler_name: str | None, schedule: str | None, native: dict) -> str | dict | None:
    """What ``Pipeline.generate(scheduler=...)`` takes for an A1111 ``sampler_name`` and ``scheduler``, given
    the export's own scheduler config ``native``; None keeps the export's own. Raises InputError for a name
    that maps to nothing."""
    native_class = native.get("_class_name")
    flow = schedulers.from_config(native).flow
    name = (sampler_name or "").strip()
    if name.lower() in DEFAULTS:
        cls, options = native_class, {}
    elif flow and name.lower() in FLOW_EULER:
        cls, options = native_class, {}
    else:
        found = _lookup(name)
        if found is None:
            known = ", ".join(SAMPLERS)
            raise InputError(f"unknown sampler {name!r}; use one of {known} (GET /sdapi/v1/samplers)")
        cls, options = found
    key = (schedule or "automatic").strip().lower()
    if key not in SCHEDULES:
        raise InputError(f"unknown scheduler {schedule!r}; use one of {', '.join(SCHEDULES)}")
    options.update(SCHEDULES[key])
    if cls == native_class and all(native.get(k) == v for k, v in options.items()):
        return None  # the export's own: exactly what the CLI runs without --scheduler
    return {"_class_name": cls, **options}
