"""How a model is held in memory while it runs, and refusing, before loading, a run that will not fit
(instead of letting the machine swap or the process be killed halfway through a generation).

Two load policies: ``resident`` keeps every session loaded (what a long-lived process wants, and the fastest
for several images); ``phased`` loads each phase's sessions (text encoders → image encoder → denoiser →
decoder) and releases them before the next, so the peak is the largest phase, not the sum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import EngineError

# ONNX Runtime keeps the weights plus prepacked copies of some, and activations on top: a full-size SD 1.5
# run at 512x512 (UNet, text encoder, VAE decoder: 4.13 GB of fp32 weights) peaked at 7.5 GB, 1.8x the
# weights (docs/benchmarks.md, memory pattern off as the engine runs). 1.9x leaves a little headroom.
WEIGHTS_FACTOR = 1.9
OVERHEAD_MB = 300.0

RESIDENT, PHASED = "resident", "phased"
POLICIES = (RESIDENT, PHASED)


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux); STEPWISE_AVAILABLE_MB overrides it (tests, containers)."""
    override = os.environ.get("STEPWISE_AVAILABLE_MB")
    if override:
        return float(override)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def estimate_mb(manifest, components) -> float:
    return manifest.weights_bytes(components) / 2**20 * WEIGHTS_FACTOR + OVERHEAD_MB


@dataclass(frozen=True)
class MemoryPlan:
    policy: str
    need_mb: float  # the estimated peak of the chosen policy
    resident_mb: float
    phased_mb: float
    available_mb: float | None
    reason: str


def plan_memory(manifest, phases: dict[str, list[str]], policy: str | None = None, available_mb=None) -> MemoryPlan:
    """Choose the policy (None: resident when the whole model fits, else phased when its largest phase
    does) and refuse a run that fits under neither; ``phases`` maps phase → its components."""
    every = [name for names in phases.values() for name in names]
    resident = estimate_mb(manifest, every)
    phased = max(estimate_mb(manifest, names) for names in phases.values() if names)
    have = available_mb if available_mb is not None else available_memory_mb()
    fits = (lambda need: True) if have is None else (lambda need: need <= have)
    if policy not in (None, *POLICIES):
        raise EngineError(f"unknown load policy {policy!r}; use one of {', '.join(POLICIES)}")
    if policy == PHASED:
        chosen, reason = PHASED, "asked for (--low-memory): each phase's sessions are released before the next"
    elif policy == RESIDENT or fits(resident):
        chosen, reason = RESIDENT, "the whole model fits in memory" if policy is None else "asked for"
    else:
        chosen = PHASED
        reason = f"the whole model needs ~{resident:,.0f} MB, {have:,.0f} MB available; its largest phase fits"
    need = resident if chosen == RESIDENT else phased
    if not fits(need):
        options = []
        if chosen == RESIDENT and fits(phased):
            options.append("--low-memory (load one phase at a time)")
        if any(name == "text_encoder_3" for name in every):
            options.append("--no-t5 (SD3 runs without its T5 encoder, as diffusers allows)")
        if manifest.data.get("precision", "fp32") == "fp32":
            options.append("an export with smaller weights when one exists for this model")
        options.append("closing other programs")
        raise EngineError(
            f"{manifest.folder.name} needs about {need:,.0f} MB of memory ({chosen}) but {have:,.0f} MB is "
            f"available; try {', or '.join(options)}"
        )
    return MemoryPlan(chosen, need, resident, phased, have, reason)
