"""OpenVINO's CPU plugin on our exported ONNX graphs, at fp32 or at its default inference precision (bf16 on
CPUs with AVX-512 BF16 / AMX).

Every family: the engine's own family code (engine/families: conditioning, guidance batch, FLUX packing,
SDXL time ids) drives the graphs, with each ONNX Runtime session replaced by an OpenVINO compiled model.
Each graph is reshaped to static shapes, input by input by name, from the first feeds it gets (what
OpenVINO's own Stable Diffusion guides do with fixed sizes), and compiled then: the benchmark's warm-up
calls (first encode, first step, first decode) carry the compilation, the timed ones do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .stepwise import StepwiseEngine


class OvGraph:
    """The ``engine.session.Graph`` interface (inputs, input_ranks, outputs, __call__) on OpenVINO."""

    def __init__(self, path, threads: int | None, core, config: dict):
        self.path, self.core, self.config = Path(path), core, config
        model = core.read_model(str(self.path))
        self.inputs, self.input_ranks = {}, {}
        for port in model.inputs:
            name = port.get_any_name()
            self.inputs[name] = port.get_element_type().to_dtype()
            self.input_ranks[name] = port.get_partial_shape().rank.get_length()
        self.outputs = [port.get_any_name() for port in model.outputs]
        self.compiled: dict[tuple, object] = {}

    def has_input(self, name: str) -> bool:
        return name in self.inputs

    def _request(self, feeds: dict):
        import openvino as ov

        key = tuple(sorted((name, value.shape) for name, value in feeds.items()))
        if key not in self.compiled:
            model = self.core.read_model(str(self.path))  # read again: the weights are not held between shapes
            model.reshape({name: ov.PartialShape(list(value.shape)) for name, value in feeds.items()})
            self.compiled[key] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.compiled[key]

    def __call__(self, outputs: list[str] | None = None, **feeds) -> dict[str, np.ndarray]:
        cast = {}
        for name, value in feeds.items():
            if name not in self.inputs:
                continue
            value = np.ascontiguousarray(value, dtype=self.inputs[name])
            cast[name] = value.reshape(()) if self.input_ranks[name] == 0 else value
        request = self._request(cast)
        request.infer(cast)
        return {name: np.array(request.get_tensor(name).data) for name in outputs or self.outputs}


class OpenVinoEngine(StepwiseEngine):
    def __init__(self, folder: str, threads: int, width: int, height: int, precision: str | None = None, **_):
        import openvino as ov

        self.core = ov.Core()
        self.config = {"INFERENCE_NUM_THREADS": threads}
        if precision:
            self.config["INFERENCE_PRECISION_HINT"] = precision
        super().__init__(folder, threads, width, height)
        self.precision = precision or str(self.core.get_property("CPU", "INFERENCE_PRECISION_HINT"))

    def graph_factory(self):
        def graph(path, threads=None):
            return OvGraph(path, threads, self.core, self.config)

        return graph
