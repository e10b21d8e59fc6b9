"""Measured per-step times on this machine, kept in a small JSON file that each run updates.

The plan printed before sampling uses them for its estimate: time = steps x time per step.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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


def step_seconds(model: str, width: int, height: int, threads: int | None) -> float | None:
    entry = load().get(key(model, width, height, threads))
    return None if entry is None else entry["median_step_ms"] / 1000.0


def record(model: str, width: int, height: int, threads: int | None, median_step_ms: float) -> None:
    """Store the latest median; written atomically so two runs never leave half a file."""
    data = load()
    data[key(model, width, height, threads)] = {"median_step_ms": round(median_step_ms, 3)}
    path = timings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".timings.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
