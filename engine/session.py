"""ONNX Runtime sessions on the CPU execution provider, and feeding them without surprises."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import EngineError

# ONNX tensor type strings → numpy dtypes, so callers can hand any dtype and the graph gets its own.
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def physical_cores() -> int:
    """Physical cores: ONNX Runtime gains nothing from SMT siblings on these convolution/matmul graphs."""
    try:
        seen = set()
        physical = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    seen.add((physical, core))
                    physical = core = None
        if core is not None:
            seen.add((physical, core))
        if seen:
            return len(seen)
    except OSError:
        pass
    return os.cpu_count() or 1


class Graph:
    """One exported component: an InferenceSession plus its input dtypes."""

    def __init__(self, path: Path, threads: int | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # NCHWc convs: 14% faster
        # The memory pattern pre-plans one block per shape; off, SD 1.5 512x512 peaks 3.1 GB lower at the same
        # step time (docs/benchmarks.md, ort_no_mem_pattern). The arena stays on: off is 14% slower.
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            raise EngineError(
                f"{path} cannot be loaded by ONNX Runtime ({str(exc).splitlines()[0][:200]}); export the model again"
            ) from None
        self.path = path
        self.inputs = {i.name: _DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def has_input(self, name: str) -> bool:
        return name in self.inputs

    def __call__(self, outputs: list[str] | None = None, **feeds) -> dict[str, np.ndarray]:
        cast = {}
        for name, value in feeds.items():
            if name not in self.inputs:
                continue  # e.g. SDXL-only inputs handed to an SD 1.5 graph
            value = np.asarray(value, dtype=self.inputs[name])
            if self.input_ranks[name] == 0:
                value = value.reshape(())  # optimum exports the UNet timestep as a scalar
            cast[name] = value
        names = outputs or self.outputs
        return dict(zip(names, self.session.run(names, cast), strict=True))
