"""Exporters: a diffusers checkpoint (hub repo id, pipeline folder or ``tiny:<family>``) → ONNX folder.

``export()`` is the one entry point (``stepwise export`` calls it); ``ExportError`` is the one exception
it raises for anything the caller can fix. ``build_tiny(name)`` rebuilds a ``tiny:<name>`` PyTorch
pipeline (deterministic), the reference the tests compare exported graphs against. docs/exporting.md
has the how-to; docs/design.md the folder layout, graph names and manifest.

Heavy imports (torch, diffusers, optimum) happen inside the functions, not when this package is
imported.
"""

from .errors import ExportError
from .families import PIPELINE_FAMILIES, TINY_SOURCES


def export(source, **kwargs):
    """See ``exporters.main.export``: returns the exported folder, raises ExportError."""
    from .main import export as _export

    return _export(source, **kwargs)


def build_tiny(name: str):
    """The ``tiny:<name>`` diffusers pipeline, fp32, seeded: the same weights on every call."""
    from .tiny import build

    return build(name)


__all__ = ["PIPELINE_FAMILIES", "TINY_SOURCES", "ExportError", "build_tiny", "export"]
