"""Shared data and formats: the model registry, step policy, models home and export manifest.

Imported by the engine, the exporters and the CLI alike; depends on nothing heavier than the stdlib.
"""

from .home import MANIFEST, exported_path, models_home, stepwise_home
from .models import Family, Model, all_models, families, family, find, get

__all__ = [
    "MANIFEST",
    "Family",
    "Model",
    "all_models",
    "exported_path",
    "families",
    "family",
    "find",
    "get",
    "models_home",
    "stepwise_home",
]
