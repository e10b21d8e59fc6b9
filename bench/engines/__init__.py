"""The engines the benchmark times, each behind one small interface (``base.Engine``), built inside its own
worker process by ``make(kind, **options)`` so its memory is measured alone."""

from __future__ import annotations


def make(kind: str, **options):
    if kind == "stepwise":
        from .stepwise import StepwiseEngine

        return StepwiseEngine(**options)
    if kind == "ort":
        from .ort import OrtEngine

        return OrtEngine(**options)
    if kind == "pytorch":
        from .pytorch import TorchEngine

        return TorchEngine(**options)
    if kind == "openvino":
        from .openvino import OpenVinoEngine

        return OpenVinoEngine(**options)
    raise ValueError(f"unknown engine kind {kind!r}")
