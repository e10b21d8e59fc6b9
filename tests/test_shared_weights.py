"""exporters/shared_weights.py: a graph reads its weights from the whole graph's data file only where each is
there by name with the same bytes; otherwise it keeps its own copy (and still runs)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _graph(folder, weights: dict[str, np.ndarray], used: list[str]):
    """x @ w1 @ w2 ... over ``used``, every weight of ``weights`` stored in model.onnx_data, in that order."""
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir()
    nodes, value = [], "x"
    for index, name in enumerate(used):
        nodes.append(helper.make_node("MatMul", [value, name], [f"y{index}"]))
        value = f"y{index}"
    inits = [numpy_helper.from_array(weights[name], name) for name in used]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)  # fmt: skip
    return folder / "model.onnx"


def _run(path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.arange(4, dtype=np.float32)[None]})[0]


def test_a_subset_graph_reads_the_whole_graphs_weights_and_a_differing_one_keeps_its_own(tmp_path):
    from exporters.shared_weights import share

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal((4, 4)).astype(np.float32) for name in ("a", "b", "c")}
    whole = _graph(tmp_path / "whole", weights, ["a", "b", "c"])
    part = _graph(tmp_path / "part", weights, ["c", "a"])  # other offsets in its own file
    expected = _run(part)
    assert share(part, whole) == 2 * 4 * 4 * 4  # the two 4x4 float32 weights it reads
    assert (tmp_path / "part" / "model.onnx_data").samefile(tmp_path / "whole" / "model.onnx_data")
    np.testing.assert_array_equal(_run(part), expected)

    changed = dict(weights, a=weights["a"] + 1)  # same name, other bytes: not the whole's weight
    other = _graph(tmp_path / "other", changed, ["a", "b"])
    assert share(other, whole) is None
    assert not (tmp_path / "other" / "model.onnx_data").samefile(tmp_path / "whole" / "model.onnx_data")
    np.testing.assert_array_equal(_run(other), _run(_graph(tmp_path / "again", changed, ["a", "b"])))
