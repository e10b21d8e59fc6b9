"""The random pipeline → an exported Stepwise folder, through our exporter (``exporters.export``).

Until the exporter package exposes ``export``, a stand-in (``standin_export``) writes the same layout with
``torch.onnx.export`` so the measurements can start; the folder records which one made it.
"""

from __future__ import annotations

from pathlib import Path

from . import random_model


def exporter():
    """``exporters.export`` when it exists, else the stand-in."""
    try:
        from exporters import export

        return export, "exporters.export"
    except ImportError:
        from .standin_export import export

        return export, "bench.standin_export"


def exported_folder(model: str, progress=print) -> Path:
    """``$STEPWISE_HOME/bench/<kind>-<family>``: exported once, reused while its manifest is there."""
    out = random_model.cache_root() / random_model.cache_name(model)
    if (out / "stepwise.json").is_file():
        return out
    source = random_model.source_folder(model, progress)
    export, name = exporter()
    progress(f"exporting {source} with {name} → {out}")
    return Path(export(str(source), out=out, progress=progress))
