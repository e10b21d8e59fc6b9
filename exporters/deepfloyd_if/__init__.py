"""DeepFloyd IF (diffusers ``IFPipeline`` → ``IFSuperResolutionPipeline``): a pixel-space cascade.

Its stages' graphs (the T5 encoder shared by stages I and II, one UNet per stage), tiny builds and the export of
the whole cascade into one folder."""

from __future__ import annotations

from .export import FAMILY, export_cascade
from .tiny import build_cascade

__all__ = ["FAMILY", "build_cascade", "export_cascade"]
