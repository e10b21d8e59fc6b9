"""The runtime: exported ONNX graphs on ONNX Runtime's CPU execution provider, numpy and tokenizers only.

No torch, no diffusers: tests/test_boundaries.py proves it.
"""

from .errors import EngineError
from .memory import PHASED, RESIDENT, plan_memory
from .pipeline import Pipeline, Result, load_pipeline
from .png import png_bytes, save_png
from .profile import format_profile
from .sampling import Step, sample

__all__ = [
    "PHASED",
    "RESIDENT",
    "EngineError",
    "Pipeline",
    "Result",
    "Step",
    "format_profile",
    "load_pipeline",
    "plan_memory",
    "png_bytes",
    "sample",
    "save_png",
]
