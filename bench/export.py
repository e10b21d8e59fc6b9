"""The random pipeline → an exported Stepwise folder, through our exporter (``exporters.export``)."""

from __future__ import annotations

from pathlib import Path

from . import random_model


def exported_folder(model: str, progress=print) -> Path:
    """``$STEPWISE_HOME/bench/<kind>-<family>``: exported once, reused while its manifest is there."""
    out = random_model.cache_root() / random_model.cache_name(model)
    if (out / "stepwise.json").is_file():
        return out
    from exporters import export

    source = random_model.source_folder(model, progress)
    progress(f"exporting {source} with exporters.export → {out}")
    return Path(export(str(source), out=out, progress=progress))
