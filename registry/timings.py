"""Measured per-step times on this machine, kept in a small JSON file that each run updates.

The plan printed before sampling uses them for its estimate: time = steps x time per step.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write_text
from .home import stepwise_home


def timings_path() -> Path:
    return stepwise_home() / "timings.json"


def key(model: str, width: int, height: int, threads: int | None) -> str:
    return f"{model}|{width}x{height}|threads={threads or 'auto'}"


def load() -> dict:
    try:
        return json.loads(timings_path().read_text())
    except (OSError, ValueError):
        return {}


PARTS = ("load_ms", "text_encoder_ms", "vae_encode_ms", "vae_decode_ms")  # what a run costs besides its steps


def measured(model: str, width: int, height: int, threads: int | None) -> dict | None:
    """The last run's ``median_step_ms`` and the parts around the steps (``PARTS``, where recorded)."""
    entry = load().get(key(model, width, height, threads))
    return entry if isinstance(entry, dict) and "median_step_ms" in entry else None


def step_seconds(model: str, width: int, height: int, threads: int | None) -> float | None:
    entry = measured(model, width, height, threads)
    return None if entry is None else entry["median_step_ms"] / 1000.0


def record(
    model: str, width: int, height: int, threads: int | None, median_step_ms: float, parts: dict | None = None
) -> None:
    """Store the latest median and parts; written atomically so two runs never leave half a file."""
    data = load()
    entry = {"median_step_ms": round(median_step_ms, 3)}
    entry.update({name: round(float(parts[name]), 3) for name in PARTS if parts and parts.get(name) is not None})
    data[key(model, width, height, threads)] = entry
    atomic_write_text(timings_path(), json.dumps(data, indent=2, sort_keys=True))
