"""The random pipeline → exported Stepwise folders, through our exporter (``exporters.export``), once each.

One folder per export variant, beside each other under ``$STEPWISE_HOME/bench``: ``<kind>-<family>-fp32``
is what ``stepwise export`` writes by default (the engine's graph: fp32, UNet attention fused for the CPU),
``-fp32-plain`` the same without the fusion (what OpenVINO reads, and the fusion's baseline), ``-int8``,
``-int8-static`` and ``-int4`` the precision modes (``--weights int8 --vae-weights int8``, ``--weights int8-static
--vae-weights int8``, ``--weights int4``).
"""

from __future__ import annotations

from pathlib import Path

from . import random_model

VARIANTS = {
    "fp32": {"weights": "fp32", "fuse": True},
    "fp32-plain": {"weights": "fp32", "fuse": False},
    "int8": {"weights": "int8", "vae_weights": "int8", "fuse": True},
    "int8-static": {"weights": "int8-static", "vae_weights": "int8", "fuse": True},
    "int4": {"weights": "int4", "fuse": True},
}


def _export(source: Path, out: Path, variant: str, progress) -> Path:
    if (out / "stepwise.json").is_file():
        return out
    from exporters import export

    progress(f"exporting {source} with exporters.export({VARIANTS[variant]}) → {out}")
    return Path(export(str(source), out=out, progress=progress, **VARIANTS[variant]))


def exported_folder(model: str, progress=print, variant: str = "fp32") -> Path:
    """``$STEPWISE_HOME/bench/<kind>-<family>-<variant>``: exported once, reused while its manifest is there."""
    out = random_model.cache_root() / f"{random_model.cache_name(model)}-{variant}"
    if (out / "stepwise.json").is_file():
        return out
    return _export(random_model.source_folder(model, progress), out, variant, progress)


def sibling(folder: Path, source: Path, variant: str, progress=print) -> Path:
    """The model of the export ``folder`` (from the pipeline ``source``) exported as ``variant``, beside it."""
    base = folder.name
    for name in sorted(VARIANTS, key=len, reverse=True):
        if base.endswith(f"-{name}"):
            base = base[: -len(name) - 1]
            break
    return _export(source, folder.with_name(f"{base}-{variant}"), variant, progress)
