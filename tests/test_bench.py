"""The benchmark's machinery: FLOP counting against hand-computed numbers, and one end-to-end run on the
tiny SD 1.5 pipeline (our engine and a tuning candidate, interleaved) that writes the JSON and the chart."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench import flops  # noqa: E402


def _save(tmp_path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_matmul_conv_gemm_flops_match_hand_count(tmp_path):
    rng = np.random.default_rng(0)
    w_mm = numpy_helper.from_array(rng.standard_normal((7, 11)).astype(np.float32), "w_mm")
    w_conv = numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "w_conv")
    w_gemm = numpy_helper.from_array(rng.standard_normal((6, 9)).astype(np.float32), "w_gemm")
    nodes = [
        helper.make_node("MatMul", ["a", "w_mm"], ["mm"]),  # (2,3,5,7) x (7,11)
        helper.make_node("Conv", ["x", "w_conv"], ["conv"], group=2, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Gemm", ["g", "w_gemm"], ["gemm"], transB=1),  # (4,9) x (6,9)^T
        helper.make_node("MatMul", ["q", "k"], ["scores"]),  # attention-like: (b,h,s,d) x (b,h,d,l)
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3, 5, 7]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "hh", "ww"]),
        helper.make_tensor_value_info("g", TensorProto.FLOAT, [4, 9]),
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 8, 16, 5]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 8, 5, 12]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("mm", "conv", "gemm", "scores")]
    path = _save(tmp_path, nodes, inputs, outputs, [w_mm, w_conv, w_gemm])

    counted = flops.count(path, {"a": (2, 3, 5, 7), "x": (1, 4, 10, 10)})

    matmul = 2 * (2 * 3 * 5) * 11 * 7  # 2·M·N·K over the 2·3 batch
    conv = 2 * 8 * (4 // 2) * 3 * 3 * 5 * 5  # stride 2 → 5×5 outputs; Cin/groups = 2
    gemm = 2 * 4 * 6 * 9
    scores = 2 * (2 * 8) * 16 * 12 * 5
    assert counted.unresolved == []
    assert counted.by_op["MatMul"] == matmul
    assert counted.by_op["Conv"] == conv
    assert counted.by_op["Gemm"] == gemm
    assert counted.by_op["MatMul (attention)"] == scores
    assert counted.total == matmul + conv + gemm + scores


def test_shapes_through_reshape_chains_are_resolved(tmp_path):
    """Shape→Gather→Concat→Reshape, as the exporters write attention head splits, at a concrete input size."""
    w = numpy_helper.from_array(np.ones((6, 4), np.float32), "w")
    idx = numpy_helper.from_array(np.array(0, np.int64), "zero")
    rest = numpy_helper.from_array(np.array([3, 2], np.int64), "rest")
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "rest"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"]),  # (b, 6) → (b, 3, 2)
        helper.make_node("Reshape", ["y", "flat"], ["z"]),
        helper.make_node("MatMul", ["z", "w"], ["out"]),
    ]
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    flat = numpy_helper.from_array(np.array([-1, 6], np.int64), "flat")
    path = _save(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w, idx, rest, axes, flat],
    )
    counted = flops.count(path, {"x": (5, 6)})
    assert counted.total == 2 * 5 * 4 * 6


@pytest.mark.slow
def test_bench_end_to_end_on_tiny_sd15(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from click.testing import CliRunner

    from bench.cli import bench_cmd

    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--model", "tiny:sd15", "--width", "64", "--height", "64", "--repeats", "2", "--steps", "4"]
    args += ["--engines", "stepwise,ort_no_spin", "--no-peak", "--json", str(out_json), "--chart", str(out_png)]
    cli = CliRunner().invoke(bench_cmd, args, catch_exceptions=False)
    assert cli.exit_code == 0, cli.output
    assert "| stepwise |" in cli.output

    data = json.loads(out_json.read_text())
    for key in ("model", "width", "height", "threads", "flops_per_step", "peak_gflops", "results"):
        assert key in data
    assert (data["model"], data["width"], data["height"]) == ("tiny:sd15", 64, 64)
    assert data["flops_per_step"] > 0 and data["vae_decode_flops"] > 0
    assert set(data["results"]) == {"stepwise", "ort_no_spin"}
    for result in data["results"].values():
        assert result["median_step_s"] > 0 and result["vae_decode_s"] > 0 and result["peak_rss_mb"] > 0
        assert len(result["step_s"]) == 2
    # the same graph on the same session settings but spinning: the same numbers
    assert data["results"]["ort_no_spin"]["latent_max_diff"] < 1e-4
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
