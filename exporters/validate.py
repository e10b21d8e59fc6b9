"""Export-time validation: every graph against its PyTorch module, with onnxruntime, at two shapes.

The PyTorch outputs are computed first (``references``), so the module can be freed before the graph
is loaded into onnxruntime: a big UNet is never in memory twice during validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .components import ATOL, RTOL, Component

CASES = ("a", "b")
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class ValidationFailed(Exception):
    """The graph does not load, lacks a name, or differs from PyTorch beyond the tolerance."""


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds_for(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast inputs to the dtypes the graph declares (int32 or int64 ids, float timesteps, ...)."""
    out = {}
    for arg in sess.get_inputs():
        if arg.name not in feeds:
            raise ValidationFailed(f"the graph has an input {arg.name!r} we have no value for")
        out[arg.name] = np.asarray(feeds[arg.name]).astype(_ORT_TYPES.get(arg.type, np.float32))
    return out


def references(component: Component) -> list[tuple[dict, dict]]:
    """(inputs, PyTorch outputs) for each validation case."""
    result = []
    for case in CASES:
        feeds = component.example(case)
        result.append((feeds, component.reference(feeds)))
    return result


class Names:
    """What ``check`` needs of a Component once its module is gone: the graph's input and output names."""

    def __init__(self, component):
        self.inputs, self.outputs = dict.fromkeys(component.inputs), dict.fromkeys(component.outputs)


_ONNX_TYPES = {1: "float", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "double"}


def graph_signature(path: Path) -> dict:
    """``signature`` read from the graph file alone (no weights loaded, no session)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = {}
        for v in values:
            tensor = v.type.tensor_type
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
            out[v.name] = {"dtype": _ONNX_TYPES.get(tensor.elem_type, str(tensor.elem_type)), "shape": dims}
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def signature(sess) -> dict:
    def describe(args):
        return {
            a.name: {"dtype": a.type[len("tensor(") : -1], "shape": [d if d is not None else "?" for d in a.shape]}
            for a in args
        }

    return {"inputs": describe(sess.get_inputs()), "outputs": describe(sess.get_outputs())}


def check(
    component: Component,
    path: Path,
    refs: list[tuple[dict, dict]],
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    min_snr_db: float | None = None,
    trajectory: list[tuple[dict, dict]] | None = None,
) -> dict:
    """Compare the graph with the PyTorch outputs; the numbers for the manifest (and ``graph``: its
    input/output names, dtypes and shapes). Raises ValidationFailed when the names differ from the
    contract, a shape does not run, or max|diff| exceeds ``atol + rtol * max|reference|`` — or, for a
    quantized graph (``min_snr_db``), when the outputs' signal-to-noise ratio against PyTorch,
    10·log10(Σ ref² / Σ (graph − ref)²) over every output, is below ``min_snr_db``. The SNR is taken on
    ``trajectory`` (inputs and PyTorch outputs recorded while the model sampled: the inputs a quantized graph
    was calibrated for and will see) when given; ``refs`` then only prove the shapes run."""
    try:
        sess = session(path)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValidationFailed(f"onnxruntime cannot load it ({str(exc).splitlines()[0][:300]})") from None
    inputs = [arg.name for arg in sess.get_inputs()]
    outputs = [arg.name for arg in sess.get_outputs()]
    if set(inputs) != set(component.inputs) or set(outputs) != set(component.outputs):
        raise ValidationFailed(
            f"graph names {inputs} -> {outputs} differ from the contract "
            f"{list(component.inputs)} -> {list(component.outputs)}"
        )
    worst = 0.0
    largest = 0.0
    signal = noise = 0.0
    shapes = []
    for feeds, reference in refs:
        feeds = feeds_for(sess, feeds)
        shapes.append({name: list(value.shape) for name, value in feeds.items()})
        try:
            got = sess.run(outputs, feeds)
        except Exception as exc:
            first = str(exc).splitlines()[0][:300]
            raise ValidationFailed(f"onnxruntime fails at input shapes {shapes[-1]} ({first})") from None
        for name, value in zip(outputs, got, strict=True):
            ref = reference[name]
            if value.shape != ref.shape:
                raise ValidationFailed(
                    f"output {name} has shape {list(value.shape)} where PyTorch gives {list(ref.shape)} "
                    f"(inputs {shapes[-1]}): a size is baked into the graph"
                )
            if not np.all(np.isfinite(value)):
                raise ValidationFailed(f"output {name} has NaN/inf at inputs {shapes[-1]}")
            if ref.size:
                diff = value.astype(np.float64) - ref
                worst = max(worst, float(np.max(np.abs(diff))))
                largest = max(largest, float(np.max(np.abs(ref))))
                signal += float(np.sum(np.square(ref, dtype=np.float64)))
                noise += float(np.sum(np.square(diff)))
    tolerance = atol + rtol * largest
    result = {
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "atol": atol,
        "rtol": rtol,
        "max_abs_reference": largest,
        "shapes": shapes,
        "graph": signature(sess),
    }
    if min_snr_db is not None:
        snr = _snr_db(signal, noise)
        del result["tolerance"], result["atol"], result["rtol"]
        if trajectory:
            result["snr_db_test_inputs"] = round(snr, 2)
            signal = noise = 0.0
            for feeds, reference in trajectory:
                got = sess.run(outputs, feeds_for(sess, feeds))
                for name, value in zip(outputs, got, strict=True):
                    signal += float(np.sum(np.square(reference[name], dtype=np.float64)))
                    noise += float(np.sum(np.square(value.astype(np.float64) - reference[name])))
            snr = _snr_db(signal, noise)
            result["snr_inputs"] = f"{len(trajectory)} calibration inputs"
        result.update(snr_db=round(snr, 2), min_snr_db=min_snr_db)
        if not snr >= min_snr_db:
            raise ValidationFailed(
                f"the quantized outputs are {snr:.1f} dB from PyTorch's (signal-to-noise), below {min_snr_db:g} dB"
            )
        return result
    if not worst <= tolerance:
        raise ValidationFailed(
            f"max|onnx - torch| = {worst:.3g} exceeds the tolerance {tolerance:.3g} "
            f"(atol {atol:g} + rtol {rtol:g} x max|reference| {largest:.3g})"
        )
    return result


def _snr_db(signal: float, noise: float) -> float:
    return float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")


def validate(component: Component, path: Path, **tolerances) -> dict:
    """``check`` against fresh references (the module must still be alive)."""
    return check(component, path, references(component), **tolerances)
