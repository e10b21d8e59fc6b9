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


def signature(sess) -> dict:
    def describe(args):
        return {
            a.name: {"dtype": a.type[len("tensor(") : -1], "shape": [d if d is not None else "?" for d in a.shape]}
            for a in args
        }

    return {"inputs": describe(sess.get_inputs()), "outputs": describe(sess.get_outputs())}


def check(
    component: Component, path: Path, refs: list[tuple[dict, dict]], *, atol: float = ATOL, rtol: float = RTOL
) -> dict:
    """Compare the graph with the PyTorch outputs; the numbers for the manifest (and ``graph``: its
    input/output names, dtypes and shapes). Raises ValidationFailed when the names differ from the
    contract, a shape does not run, or max|diff| exceeds ``atol + rtol * max|reference|``."""
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
                worst = max(worst, float(np.max(np.abs(value.astype(np.float64) - ref))))
                largest = max(largest, float(np.max(np.abs(ref))))
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
    if not worst <= tolerance:
        raise ValidationFailed(
            f"max|onnx - torch| = {worst:.3g} exceeds the tolerance {tolerance:.3g} "
            f"(atol {atol:g} + rtol {rtol:g} x max|reference| {largest:.3g})"
        )
    return result


def validate(component: Component, path: Path, **tolerances) -> dict:
    """``check`` against fresh references (the module must still be alive)."""
    return check(component, path, references(component), **tolerances)
