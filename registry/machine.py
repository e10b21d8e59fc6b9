"""What this machine has, read the same way by the exporter and the engine (no runtime imported)."""

from __future__ import annotations

import os


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
