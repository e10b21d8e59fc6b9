"""Where exported models live: ``$STEPWISE_HOME/models``, default ``~/.cache/stepwise/models``."""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "stepwise.json"


def stepwise_home() -> Path:
    env = os.environ.get("STEPWISE_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "stepwise"


def models_home() -> Path:
    return stepwise_home() / "models"


def exported_path(model_id: str) -> Path | None:
    """The exported folder for a registry id, or None when it has not been exported (no manifest)."""
    folder = models_home() / model_id
    return folder if (folder / MANIFEST).is_file() else None
