"""The runtime: exported ONNX graphs on ONNX Runtime's CPU execution provider, numpy and tokenizers only.

No torch, no diffusers: tests/test_boundaries.py proves it.
"""

from .errors import EngineError
from .pipeline import Pipeline, Result, load_pipeline
from .png import save_png
from .profile import format_profile

__all__ = ["EngineError", "Pipeline", "Result", "format_profile", "load_pipeline", "save_png"]
