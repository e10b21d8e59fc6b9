"""Reading scheduler configs: a dict, or a path to diffusers' scheduler_config.json."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


class SchedulerConfig(dict):
    """The resolved options of one scheduler, readable as keys or attributes (as diffusers' FrozenDict).

    Treat it as read-only: a scheduler reads it on every call, so edits would silently change numbers.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"SchedulerConfig is read-only (tried to set {name!r})")


def load_config(config: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    """A plain dict from a mapping, a scheduler_config.json path, or a folder holding one."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        candidates = [
            os.path.join(path, "scheduler_config.json"),
            os.path.join(path, "scheduler", "scheduler_config.json"),
        ]
        found = [candidate for candidate in candidates if os.path.isfile(candidate)]
        if not found:
            raise FileNotFoundError(f"no scheduler_config.json in {path}")
        path = found[0]
    with open(path, encoding="utf-8") as handle:
        loaded = json.load(handle)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a scheduler config must be a JSON object")
    return loaded
