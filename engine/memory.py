"""Refuse, before loading, a model that will not fit in memory, instead of letting the machine swap or the
process be killed halfway through a generation."""

from __future__ import annotations

import os

from .errors import EngineError

# ONNX Runtime keeps the weights plus prepacked copies of some, and activations on top: a full-size SD 1.5
# run at 512x512 (UNet, text encoder, VAE decoder: 4.13 GB of fp32 weights) peaked at 7.5 GB, 1.8x the
# weights (docs/benchmarks.md, memory pattern off as the engine runs). 1.9x leaves a little headroom.
WEIGHTS_FACTOR = 1.9
OVERHEAD_MB = 300.0


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


def check_memory(manifest, components, available_mb: float | None = None) -> float:
    need = estimate_mb(manifest, components)
    have = available_mb if available_mb is not None else available_memory_mb()
    if have is None or need <= have:
        return need
    options = []
    if "text_encoder_3" in components:
        options.append("--no-t5 (SD3 runs without its T5 encoder, as diffusers allows)")
    if manifest.data.get("precision", "fp32") == "fp32":
        options.append("an export with smaller weights when one exists for this model")
    options.append("closing other programs")
    raise EngineError(
        f"{manifest.folder.name} needs about {need:,.0f} MB of memory but {have:,.0f} MB is "
        f"available; try {', or '.join(options)}"
    )
